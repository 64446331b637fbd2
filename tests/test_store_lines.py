"""Lines of ours in the spool, and our line at the end of damage glued before it
(qmagic.store.lines; folded by qmagic.store.database.rows_from_lines): the rule every
reader applies, on plain bytes."""

from __future__ import annotations

import orjson
import pytest
from store_helpers import task

from qmagic.store.lines import salvage


@pytest.mark.parametrize("uid", ["abc", "é-1", "測定-7", "🧪"])
def test_our_line_after_foreign_bytes_is_found_whatever_its_uid(uid):
    """salvage compared the uid's bytes with a slice as long as its characters: a task whose
    uid has a non-ASCII character was lost behind another program's bytes."""
    for line in (orjson.dumps([1, uid, task(uid)]), orjson.dumps([2, uid, 1.5])):
        assert salvage(b"junk " + line) == 5
        assert salvage(b'[3,"half-a-line-of-anot' + line) == 23
