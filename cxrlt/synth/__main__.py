"""`python -m cxrlt.synth --out DIR ...`: see cxrlt.synth.dataset.main."""

from cxrlt.core.cli import main_wrapper
from cxrlt.synth.dataset import main

main_wrapper(main)
