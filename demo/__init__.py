"""`qwen-vl demo` (`demo.run`): the offline shapes-world run.

Importing this package sets `OMP_WAIT_POLICY=PASSIVE` unless the variable is set already: torch's OpenMP threads
then sleep instead of spinning while they wait. On the demo's 2-core machine that is what lets the DataLoader
worker (`dataloader_num_workers: 1`, see `run.DemoSize.common`) collate the next batch while the model computes, and it
keeps a step from slowing down several-fold when any other process takes a core (measured in
`benchmarks/demo_step_times.py`). OpenMP reads the variable once, when torch loads it: `qwen-vl demo` imports this
package before torch; where torch is imported first, this has no effect.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
