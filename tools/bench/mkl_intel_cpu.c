/* The same answer to MKL's vendor check that the prefalign executable gives (src/runtime.rs), for a Python
 * process: on AMD CPUs MKL then picks its kernels by instruction set, as on Intel's. To time TRL with it:
 *
 *   cc -shared -fPIC -o /tmp/mkl_intel_cpu.so tools/bench/mkl_intel_cpu.c
 *   LD_PRELOAD=/tmp/mkl_intel_cpu.so .venv-fixtures/bin/python tools/bench/trl_bench.py ...
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
