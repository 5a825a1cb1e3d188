"""Test-session settings.

Tests run tiny models whose ops are microseconds long; with torch's default two threads on a 2-core machine
shared with another process, such ops were measured 10-100x slower (OpenMP threads waiting on each other).
One thread is as fast when idle and robust when not.
"""

import torch

torch.set_num_threads(1)
