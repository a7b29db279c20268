"""Model-family adapters for aiba, installed as ``aiba.backends``.

Nothing here is imported by ``aiba`` itself: a backend's heavy dependency is only imported
when that backend is asked for.
"""
