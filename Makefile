# The two front doors: `make demo` and `make test`. Each sets up what it needs.
# `make docs` builds the documentation site into docs/_build/html.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 5000
HTMX_VERSION ?= 4.0.1
AXE_VERSION ?= 4.14.1

.PHONY: demo test docs bench browser redis wrk clean vendor-htmx vendor-axe

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A stamp per requirements file: pip runs again only when the file changes.
$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements-dev.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

$(VENV)/.docs-deps: requirements-docs.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-docs.txt
	touch $@ $(VENV)/.run-deps

demo: $(VENV)/.run-deps
	@echo ""
	@echo "  Dashboard: http://$(HOST):$(PORT)   (Ctrl+C stops it)"
	@echo ""
	BIND=$(HOST):$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py

# The same dashboard on Redis, for a talk about scale-out: a private redis-server (on a
# socket in a fresh directory, gone with it), two RQ worker processes, and the web app.
# Ctrl+C stops all four (the workers finish their tasks first, while Redis still runs).
demo-redis: $(VENV)/.run-deps redis
	@command -v redis-server >/dev/null 2>&1 || { echo "demo-redis needs Debian's redis-server"; exit 1; }
	@dir=$$(mktemp -d /tmp/queue-demo-redis.XXXXXX); sock=$$dir/redis.sock; \
	setsid redis-server --port 0 --unixsocket $$sock --unixsocketperm 700 --save '' \
	  --appendonly no --dir $$dir --loglevel warning & redis=$$!; \
	trap ':' INT TERM; \
	for i in $$(seq 100); do [ -S $$sock ] && break; sleep 0.1; done; \
	export FLASK_QUEUE_URL=unix://$$sock; \
	$(BIN)/flask --app dashboard queue worker & w1=$$!; \
	$(BIN)/flask --app dashboard queue worker & w2=$$!; \
	echo ""; echo "  Dashboard on Redis: http://$(HOST):$(PORT)   two RQ workers   (Ctrl+C stops it)"; echo ""; \
	BIND=$(HOST):$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py; \
	wait $$w1 $$w2; kill $$redis; wait $$redis; rm -rf $$dir

# The docs are part of the test: a broken link, reference or docstring fails it.
test: $(VENV)/.dev-deps browser redis docs
	$(BIN)/python -m pytest

# Nitpicky (-n), every warning an error (-W), all reported (--keep-going); -E reads
# every page again, so a warning in a page that did not change is not hidden.
docs: $(VENV)/.docs-deps
	$(BIN)/sphinx-build -E -W --keep-going -n -b html docs docs/_build/html

bench: $(VENV)/.dev-deps wrk
	$(BIN)/python -m bench

# Debian's wrk loads the HTTP rows of `make bench`. Installed when we can (root
# with apt-get); otherwise the bench uses its own Python load client and says so.
wrk:
	@if command -v wrk >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing wrk with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } || \
	  echo "could not install wrk: the HTTP rows use bench's Python load client"; \
	else echo "wrk not found and cannot install it here: the HTTP rows use bench's Python load client (install Debian's wrk package)"; fi

# Debian's Chromium for the browser tests. Installed when we can (root with
# apt-get, as in CI); otherwise the browser tests say how to get it.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; \
	else echo "chromium not found and cannot install it here: browser tests will be skipped (install Debian's chromium package)"; fi

# Debian's redis-server for the Redis tests, which start a private one of their
# own (the package's daemon is not used). Installed when we can (root with
# apt-get, as in CI); otherwise the Redis tests say how to get it.
redis:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing redis-server with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }; \
	else echo "redis-server not found and cannot install it here: Redis tests will be skipped (install Debian's redis-server package)"; fi

# Maintainers only: fetch a pinned htmx from the npm registry and record its hashes.
vendor-htmx:
	rm -rf .vendor-tmp && mkdir .vendor-tmp
	cd .vendor-tmp && npm pack -q htmx.org@$(HTMX_VERSION) && tar xzf htmx.org-$(HTMX_VERSION).tgz
	cp .vendor-tmp/package/dist/htmx.min.js static/htmx/htmx.min.js
	cp .vendor-tmp/package/dist/ext/hx-ptag.min.js static/htmx/ext/hx-ptag.min.js
	cp .vendor-tmp/package/LICENSE static/htmx/LICENSE
	echo "htmx.org $(HTMX_VERSION)" > static/htmx/VERSION
	cd static/htmx && sha256sum htmx.min.js ext/hx-ptag.min.js LICENSE > SHA256SUMS
	rm -rf .vendor-tmp

# Maintainers only: fetch a pinned axe-core for the accessibility browser tests
# (tests only, never served to users) and record its hashes.
vendor-axe:
	rm -rf .vendor-tmp && mkdir .vendor-tmp
	cd .vendor-tmp && npm pack -q axe-core@$(AXE_VERSION) && tar xzf axe-core-$(AXE_VERSION).tgz
	mkdir -p tests/vendor/axe-core
	cp .vendor-tmp/package/axe.min.js tests/vendor/axe-core/axe.min.js
	cp .vendor-tmp/package/LICENSE tests/vendor/axe-core/LICENSE
	echo "axe-core $(AXE_VERSION)" > tests/vendor/axe-core/VERSION
	cd tests/vendor/axe-core && sha256sum axe.min.js LICENSE > SHA256SUMS
	rm -rf .vendor-tmp

clean:
	rm -rf $(VENV) .pytest_cache docs/_build
