# `make run`: set up (once) and run the default job. `make test`: set up (once) and run the tests.
.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/python run.py $(ARGS)

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadgroup -m "not benchmark" $(ARGS)
