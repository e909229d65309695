"""batch.PageRows, the scheduler's persistent host page table: gathered rows equal each sequence's
page_ids (0-padded) through set / extend / drop, row reuse and growth past its first shape."""
import random

import numpy as np

from jaxserve.batch import PageRows
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams


def test_rows_follow_page_ids_through_growth_and_reuse():
    rng = random.Random(0)
    rows = PageRows(num_rows=2, num_cols=3)
    seqs = [Sequence(str(i), 0, [1], SamplingParams()) for i in range(6)]
    held: dict[Sequence, list[int]] = {}
    for _ in range(300):
        seq = rng.choice(seqs)
        op = rng.random()
        if seq not in held or op < 0.2:
            held[seq] = [rng.randrange(1000) for _ in range(rng.randrange(1, 5))]
            rows.set(seq, held[seq])
        elif op < 0.8:
            new = [rng.randrange(1000) for _ in range(rng.randrange(1, 4))]
            rows.extend(seq, new)
            held[seq] += new
        else:
            rows.drop(seq)
            del held[seq]
        if held:
            live = list(held)
            table = rows.gather(rows.rows(live))
            width = max(len(p) for p in held.values())
            expect = np.zeros((len(live), width), np.int32)
            for i, s in enumerate(live):
                expect[i, :len(held[s])] = held[s]
            np.testing.assert_array_equal(table, expect)
    assert rows.table.shape[0] >= 6 and rows.table.shape[1] > 3  # grew both ways
