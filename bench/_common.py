"""Helpers shared by the bench scripts: one timer (triton.testing.do_bench on a GPU, a median of wall times on a
CPU) and the peak RSS of a fresh process."""
import resource
import statistics
import time


def make_timer(cuda: bool, cpu_reps: int):
    """bench(fn, grads=()) -> median ms of fn(), with each tensor in `grads` given .grad = None before each call.
    GPU: triton.testing.do_bench. CPU: one untimed call, then the median of `cpu_reps` timed calls."""
    if cuda:
        import triton.testing

        def bench(fn, grads=()):
            return triton.testing.do_bench(fn, grad_to_none=list(grads), return_mode="median")
        return bench

    def bench_cpu(fn, grads=()):
        fn()
        times = []
        for _ in range(cpu_reps):
            for g in grads:
                g.grad = None
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    return bench_cpu


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM where /proc has it, else ru_maxrss (Linux: KiB). ru_maxrss is only
    the fallback: it also holds the peak of the process that exec'd this one, and clear_refs does not lower it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> int:
    """Lower the peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to clear_refs), so that a peak while
    building the inputs or loading the models does not hide the measured work's own; return the mark in bytes.
    Where this is refused the mark keeps the earlier peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss()
