# Fuzzing: every Go fuzz target, FUZZTIME each (hack/fuzz.sh).

FUZZTIME ?= 5m

.PHONY: fuzz
fuzz: ## Run every Go fuzz target (or those FUZZ matches) for FUZZTIME each (default 5m), one after another; fails on any crash
	FUZZTIME=$(FUZZTIME) hack/fuzz.sh
