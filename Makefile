# The README's two commands. Each installs what it needs into ./.venv first.
.PHONY: install demo test

install:
	bash scripts/install.sh

# A short centralized MoPs run on the embedded SmolLM2 and ../shared/data (about 5 minutes on 2 cores).
demo: install
	.venv/bin/mops train --dataset dolly --method mops --steps 100 --eval-samples 128 --out runs/demo

test: install
	.venv/bin/python -m pytest -q
