# The README's two commands, and the edit-test loop. Each installs what it needs into ./.venv first.
.PHONY: demo test test-fast settings-doc

# The main job: federated MoPs, a Ray-backed Flower simulation of 100 clients on the embedded
# SmolLM2 and ../shared/data; results in runs/federated/.
demo:
	bash scripts/demo.sh

# Everything, Ray simulations and real SuperLink/SuperNode processes included (what CI runs).
test:
	bash scripts/install.sh
	.venv/bin/python -m pytest -q

# The edit-test loop: the tests that start no process (Ray, SuperLink, compiler).
test-fast:
	bash scripts/install.sh
	.venv/bin/python -m pytest -q -m "not slow"

# docs/settings.md from the settings' own help texts (a test fails when it is stale).
settings-doc:
	.venv/bin/python -m mops_core.cli settings --markdown > docs/settings.md
