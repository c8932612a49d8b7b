PYTHON ?= python3

.PHONY: deps lint test unit e2e demo bench schema screenshots

deps:
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt

lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Everything CI runs, cheapest first so a mistake fails in seconds: lint, unit and installer tests,
# then provisioning (constraints-pinned, cached) and the end-to-end suite on every pinned Open WebUI,
# as two pytest sessions at once split by release (tests/e2e/streams.py).
test: lint
	$(PYTHON) -m pytest -m "not e2e"
	$(PYTHON) -m tests.e2e.provision
	$(PYTHON) -m tests.e2e.streams

e2e: deps
	$(PYTHON) -m tests.e2e.provision
	$(PYTHON) -m tests.e2e.streams

unit: deps
	$(PYTHON) -m pytest -m "not e2e"

demo: deps
	$(PYTHON) -m tests.e2e.demo

bench: deps
	$(PYTHON) -m bench

# The README's screenshots, docs/images/<name>-<release>.png: the browser suite writes them as it walks.
screenshots: deps
	API_KEY_GUARD_SCREENSHOTS=1 $(PYTHON) -m pytest tests/e2e/test_browser.py

schema:
	$(PYTHON) -m valves_schema.generate
