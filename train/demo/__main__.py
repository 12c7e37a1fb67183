"""`python -m train.demo [--quick] [--seeds 0,1,2]`: the same as `python train/main.py` with those flags."""
import sys

from train.demo import main

sys.exit(main())
