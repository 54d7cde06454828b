# The two commands of the README: `make run` and `make test`. Both create or
# refresh .venv first (again whenever pyproject.toml changes).
VENV ?= .venv
PASSK_EXTRAS ?= dev
export PASSK_EXTRAS
comma := ,
# one stamp per set of extras: asking for more extras installs them
STAMP := $(VENV)/.passk-installed-$(subst $(comma),-,$(PASSK_EXTRAS))

.PHONY: run test setup bench curves redis test-deps maze-repro mutation
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV)
	@touch $@

# The main job: Redis, a verifier, two rollout replicas and the trainer on the
# maze-tiny preset, then pass@k before and after RL.
run: setup redis
	$(VENV)/bin/passk up --preset configs/maze-tiny.toml --rollout-replicas 2

# The paper's maze claims at CPU scale, decided under the rule configs/experiments/maze-repro.toml
# fixes: 44 trainings through local clusters (about 2.5 hours; it continues where it stopped), then
# runs/maze-repro/REPORT.md (and docs/maze-repro/).
maze-repro: setup redis
	$(VENV)/bin/passk experiment maze-repro

# The advantage-curve report (the paper's Figures 9 and 18).
curves: setup
	$(VENV)/bin/passk advantage-curves --n 32 --k 1 4 8 --out runs/advantage-curves

# redis-server from Debian when it is missing (the services need a real one).
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# What the deployment tests run besides Redis: Prometheus (and promtool), docker-compose (it
# parses the compose file without an engine), and for the compose stack under a real engine
# (tests/integration/test_compose_engine.py): dockerd, debootstrap for the base images, tinyproxy
# and socat for the engine's namespace. kubectl with kustomize and node come with the machine.
DEPLOY_TOOLS := prometheus docker-compose dockerd debootstrap tinyproxy socat
test-deps: redis
	@for tool in $(DEPLOY_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus docker-compose docker.io debootstrap tinyproxy socat iptables; \
	fi

test: setup test-deps
	$(VENV)/bin/ruff check services bench tests
	$(VENV)/bin/python -m pytest

# Mutation testing of the advantage estimators, the loss, the maze checker, the streams and the
# sandbox: the share of mutants the tests kill (docs/TESTING.md). About an hour on 2 cores.
mutation: setup redis
	$(VENV)/bin/python scripts/mutation.py $(MODULES)

bench: setup
	$(VENV)/bin/python bench/advantage.py
