"""The model-set kernel in memory: Gelem/s of output for 2 and 4 bf16 models beside the trio's
generic tile path (the same recipe kind), 1 and 2 threads, 32 Mi elements, best of 5.

    python benches/set_kernel.py
"""

import time

import numpy as np

from mergealign_fast.kernels import cpu

COUNT = 1 << 25
BF16, VECTORS = 2, 1


def best(call, rounds: int = 5) -> float:
    call()  # warm: pages touched, threads started
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    native = cpu.native()
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0x3C00, 0x3D00, COUNT, dtype=np.uint16) for _ in range(5)]
    out = np.empty(COUNT, np.uint16)
    for threads in (1, 2):
        ops = native.Operands(*[x for a in inputs[:3] for x in (a.ctypes.data, BF16)], COUNT,
                              BF16)
        trio = native.Recipe()
        trio.kind, trio.domain.weight, trio.align.weight = VECTORS, 0.5, 0.5
        seconds = best(lambda: native.merge_recipe(ops, out.ctypes.data, trio, threads))
        row = [f"threads {threads}: trio {COUNT / seconds / 1e9:.2f}"]
        for count in (2, 4):
            set_ops = native.SetOperands(inputs[0].ctypes.data, BF16,
                                         [a.ctypes.data for a in inputs[1:1 + count]],
                                         [BF16] * count, COUNT, BF16)
            for election in (0, 1):
                recipe = native.SetRecipe()
                recipe.kind, recipe.sign_election, recipe.normalize = VECTORS, election, election
                for m in range(count):
                    recipe.term(m).weight = 1.0 / count
                seconds = best(lambda: native.merge_set(set_ops, out.ctypes.data, recipe,
                                                        threads))
                label = f"set of {count}{' election' if election else ''}"
                row.append(f"{label} {COUNT / seconds / 1e9:.2f}")
        print(", ".join(row) + " Gelem/s of output", flush=True)


if __name__ == "__main__":
    main()
