# The two commands of the README. Each sets up what it needs first (idempotent).
.PHONY: demo test setup setup-test

demo: setup
	.venv/bin/loralab demo

test: setup-test
	.venv/bin/python -m pytest -q

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh --test
