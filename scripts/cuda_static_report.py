"""Prints the CUDA C++ kernels' static table (registers, shared memory, local memory and
stack per kernel and architecture) as Markdown: `make static-report` writes it to
docs/cuda_static_report.md."""

from coordgate_ext import cuda_static_check

rows = cuda_static_check.resource_usage()
print("# CUDA C++ kernels: static resource usage\n")
print(f"Read from `{cuda_static_check.extension_path().name}` with `cuobjdump --dump-resource-usage` "
      "(`make static-report`). Local memory and stack 0 mean no register spills.\n")
print(cuda_static_check.markdown_table(rows))
