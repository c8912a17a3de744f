"""False-positive rates that terd's input detection defaults to, in one torch-free place (the CLI reads them
at startup without importing the detectors).

DEFAULT_FPR: the benign rate an input detector's threshold is set for (`terd check-inputs --fpr`).
INPUT_FPR: what `terd bench` sets it to. The input-detection goal is a *measured* FPR <= 0.1% over 10,000
benign noises; a threshold at exactly 1e-3 measures 0.1% +- 0.03% and so misses that half the time.
"""

DEFAULT_FPR = 1e-3
INPUT_FPR = 5e-4
