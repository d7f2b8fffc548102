import time
from shardset import ShardedDataset
def test_x(make_id_store):
    t = time.time(); p = make_id_store(1009, 97); w = time.time() - t
    t = time.time(); list(ShardedDataset(p, 16)); r = time.time() - t
    print("write", w, "read", r)
