"""The ESS profile image: the drawn bounds are the TSS_i the ``utilization`` tag divides by,
the y label names what is averaged, and the PNG written to TensorBoard is large enough."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import esswatch
from esswatch.layers import SequenceModel

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, D, L, B, N = 11, 16, 24, 2, 4


def _train_one(model, logdir, **kw):
    watch = esswatch.ESSWatch(model, logdir=str(logdir), every_n_steps=1, indices="all", images=True, **kw)
    x = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    model(x).float().sum().backward()
    r = watch.step()
    watch.close()
    return r


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    return struct.unpack(">II", data[16:24])


def _lines(fig):
    ax = fig.axes[0]
    return {
        ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()
    }


def test_mamba_like_profile_draws_tss_and_agrees_with_utilization(tmp_path):
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=D, n_layers=2, mixer="ssm", d_state=N)
    r = _train_one(model, tmp_path)
    plot = esswatch.watch.plot.ProfilePlot("entropy")
    img = plot.render(r)
    lines = _lines(plot.figure)
    i = np.arange(1, L)
    ref = np.minimum(N, np.minimum(i, L - i)).astype(float)  # independent: TSS_i = min(TSS, i, L-i)
    tx, ty = lines[f"TSS_i = min({N}, i, L-i)"]
    assert tx.tolist() == i.tolist() and ty.tolist() == ref.tolist()
    _, gy = lines["min(i, L-i)"]
    assert gy.tolist() == np.minimum(i, L - i).tolist()
    for name in ("blocks.0.mixer", "blocks.1.mixer"):
        lay = r["layers"][name]
        assert lay["state_size"] == N and lay["value_dim"] == 1
        x, y = lines[name]
        assert x.tolist() == lay["indices"] and y.tolist() == pytest.approx(lay["entropy"]["per_index"])
        # the picture and the tag agree: TSS_i does not depend on the row or channel, so the
        # utilization tag (mean of E / TSS_i) is the mean of the drawn ESS line over the drawn TSS line
        drawn = np.interp(lay["indices"], tx, ty)
        assert drawn.tolist() == lay["tss"]
        assert r["scalars"][f"ess/entropy/utilization/{name}"] == pytest.approx(
            np.mean(np.asarray(lay["entropy"]["per_index"]) / drawn), rel=1e-6
        )
    assert plot.figure.axes[0].get_ylabel() == "entropy-ESS (mean over channels)"
    assert img.shape[0] >= 500 and img.shape[1] >= 800
    legend = plot.figure.axes[0].get_legend()
    assert legend is not None and min(t.get_fontsize() for t in legend.get_texts()) >= 8
    # the image TensorBoard got: its PNG header
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    ev = ea.Images("ess_profile/entropy")[0]
    w, h = _png_size(ev.encoded_image_string)
    assert (w, h) == (img.shape[1], img.shape[0]) and w >= 800 and h >= 500


def test_attention_profile_says_heads_and_draws_only_the_geometric_bound(tmp_path):
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=D, n_layers=2, mixer="attention", n_heads=2)
    r = _train_one(model, tmp_path)
    plot = esswatch.watch.plot.ProfilePlot("entropy")
    plot.render(r)
    assert plot.figure.axes[0].get_ylabel() == "entropy-ESS (mean over heads)"
    lines = _lines(plot.figure)
    assert not any(k.startswith("TSS_i") for k in lines)
    i = np.arange(1, L)
    assert lines["min(i, L-i)"][1].tolist() == np.minimum(i, L - i).tolist()


def test_mixed_layers_get_one_bound_per_state_size():
    """A hybrid (attention + SSM of two widths): one dashed line per distinct TSS, 'heads or channels'."""

    def lay(state_size, value_dim):
        return {
            "seq_len": 10,
            "state_size": state_size,
            "value_dim": value_dim,
            "indices": [1, 5, 9],
            "entropy": {"per_index": [1.0, 2.0, 1.0]},
        }

    r = {"step": 3, "layers": {"attn": lay(None, 8), "ssm_a": lay(2, 1), "ssm_b": lay(3, 1), "ssm_c": lay(2, 1)}}
    plot = esswatch.watch.plot.ProfilePlot("entropy")
    plot.render(r)
    lines = _lines(plot.figure)
    assert sorted(k for k in lines if "i, L-i" in k) == [
        "TSS_i = min(2, i, L-i)",
        "TSS_i = min(3, i, L-i)",
        "min(i, L-i)",
    ]
    i = np.arange(1, 10)
    assert lines["TSS_i = min(3, i, L-i)"][1].tolist() == np.minimum(3, np.minimum(i, 10 - i)).tolist()
    assert plot.figure.axes[0].get_ylabel() == "entropy-ESS (mean over heads or channels)"
