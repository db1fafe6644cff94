import torch

from sslkit.models import KeyQueue


def test_wrap_around_with_batch_not_dividing_size():
    q = KeyQueue(size=5, dim=2)
    pushed = []
    for step in range(4):  # 4 batches of 3 into 5 slots
        keys = torch.arange(step * 3, step * 3 + 3, dtype=torch.float32)[:, None].repeat(1, 2)
        q.push(keys, labels=torch.arange(step * 3, step * 3 + 3))
        pushed.extend(range(step * 3, step * 3 + 3))
    # 12 keys written: slot i holds the last key whose index % 5 == i.
    expected = [max(j for j in pushed if j % 5 == i) for i in range(5)]
    assert q.keys[:, 0].tolist() == expected
    assert int(q.ptr) == 12 % 5 and int(q.filled) == 5


def test_labels_follow_their_keys_and_partial_fill():
    q = KeyQueue(size=8, dim=3)
    keys = torch.randn(3, 3)
    q.push(keys, labels=torch.tensor([7, 8, 9]))
    cur_keys, cur_labels = q.current()
    assert cur_keys.shape == (3, 3) and torch.equal(cur_keys, keys)
    assert cur_labels.tolist() == [7, 8, 9]
    q.push(torch.randn(2, 3))  # no labels -> -1
    assert q.current()[1].tolist() == [7, 8, 9, -1, -1]
    for _ in range(3):
        q.push(torch.randn(3, 3), labels=torch.tensor([1, 2, 3]))
    k, lab = q.current()
    assert k.shape[0] == 8
    # every key row still carries the label it was pushed with
    assert set(lab.tolist()) <= {1, 2, 3, -1, 7, 8, 9}


def test_batch_larger_than_queue_keeps_last_keys():
    q = KeyQueue(size=4, dim=1)
    q.push(torch.arange(10, dtype=torch.float32)[:, None])
    assert sorted(q.keys[:, 0].tolist()) == [6.0, 7.0, 8.0, 9.0]


def test_state_survives_save_and_load(tmp_path):
    q = KeyQueue(size=6, dim=4)
    q.push(torch.randn(4, 4), labels=torch.tensor([0, 1, 2, 3]))
    q.push(torch.randn(4, 4), labels=torch.tensor([4, 5, 6, 7]))
    torch.save(q.state_dict(), tmp_path / "q.pt")
    r = KeyQueue(size=6, dim=4)
    r.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    for name in ("keys", "labels", "ptr", "filled"):
        assert torch.equal(getattr(q, name), getattr(r, name)), name
    # and both continue identically
    extra = torch.randn(3, 4)
    q.push(extra)
    r.push(extra)
    assert torch.equal(q.keys, r.keys) and int(q.ptr) == int(r.ptr) == (8 + 3) % 6
