"""`qwen-vl demo` (`demo.run`): the offline shapes-world run."""
