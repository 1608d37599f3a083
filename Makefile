# The README's two commands. Each installs what it needs into ./.venv first.
.PHONY: demo test

# The main job: federated MoPs, a Ray-backed Flower simulation of 100 clients on the embedded
# SmolLM2 and ../shared/data; results in runs/federated/ (about 10 minutes on 2 cores).
demo:
	bash scripts/demo.sh

test:
	bash scripts/install.sh
	.venv/bin/python -m pytest -q
