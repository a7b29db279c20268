.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/aiba eval --tiny --out runs/tiny
test: setup
	.venv/bin/python -m pytest -q
