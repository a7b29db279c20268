.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/aiba eval --backend reference --out runs/reference
test: setup
	.venv/bin/python -m pytest -q
