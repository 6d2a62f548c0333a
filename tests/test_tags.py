"""The tag scheme (:mod:`esswatch.watch.tags`): the tags ``scalar_tags`` builds from a hand-built
result, ``parse_tag`` taking each apart under any logger prefix, and the custom-scalars layout
matching them the way TensorBoard does (``re.match`` from the start of the tag)."""

from __future__ import annotations

import re

import pytest

from esswatch.watch.tags import (
    FAILURES_TAG,
    MODEL,
    SECONDS_TAG,
    SKIPPED_TAG,
    STATS,
    ParsedTag,
    custom_scalars_layout,
    parse_tag,
    scalar_tags,
)


def _stats(base):
    return {
        "avg": base,
        "max": base + 0.5,
        "total": base * 4,
        "utilization": base / 10,
        "per_index": [base],
        "per_head": [base],
    }


RESULT = {
    "metrics": ["entropy", "tolerance"],
    "layers": {
        "blocks.0.mix": {"entropy": _stats(2.0), "tolerance": _stats(3.0)},
        "": {"entropy": _stats(5.0)},  # the model itself is a layer: "root"
        "model": {"entropy": _stats(7.0), "tolerance": _stats(8.0)},  # a layer named "model"
    },
    "model": {
        "entropy": {"avg": 4.0, "max": 7.5, "total": 56.0, "utilization": 0.4},
        "tolerance": {"avg": 5.5, "max": 8.5, "total": 44.0, "utilization": 0.55},
    },
    "failures": 2,
    "seconds": 0.25,
    "skipped_samples": 3,
}

EXPECTED = {
    "ess/entropy/avg/blocks.0.mix": 2.0,
    "ess/entropy/avg/root": 5.0,
    "ess/entropy/avg/model.self": 7.0,
    "ess/entropy/avg/model": 4.0,
    "ess/entropy/max/blocks.0.mix": 2.5,
    "ess/entropy/max/root": 5.5,
    "ess/entropy/max/model.self": 7.5,
    "ess/entropy/max/model": 7.5,
    "ess/entropy/total/blocks.0.mix": 8.0,
    "ess/entropy/total/root": 20.0,
    "ess/entropy/total/model.self": 28.0,
    "ess/entropy/total/model": 56.0,
    "ess/entropy/utilization/blocks.0.mix": 0.2,
    "ess/entropy/utilization/root": 0.5,
    "ess/entropy/utilization/model.self": 0.7,
    "ess/entropy/utilization/model": 0.4,
    "ess/tolerance/avg/blocks.0.mix": 3.0,
    "ess/tolerance/avg/model.self": 8.0,
    "ess/tolerance/avg/model": 5.5,
    "ess/tolerance/max/blocks.0.mix": 3.5,
    "ess/tolerance/max/model.self": 8.5,
    "ess/tolerance/max/model": 8.5,
    "ess/tolerance/total/blocks.0.mix": 12.0,
    "ess/tolerance/total/model.self": 32.0,
    "ess/tolerance/total/model": 44.0,
    "ess/tolerance/utilization/blocks.0.mix": 0.3,
    "ess/tolerance/utilization/model.self": 0.8,
    "ess/tolerance/utilization/model": 0.55,
    "ess/failures": 2.0,
    "ess/measure_seconds": 0.25,
    "ess/skipped": 3.0,
}


def test_scalar_tags_names_and_values():
    tags = scalar_tags(RESULT)
    assert tags == EXPECTED
    assert all(isinstance(v, float) for v in tags.values())
    # stable order: metric, then statistic, then the layers in their order, then the model
    assert list(tags)[:4] == [
        "ess/entropy/avg/blocks.0.mix",
        "ess/entropy/avg/root",
        "ess/entropy/avg/model.self",
        "ess/entropy/avg/model",
    ]
    assert list(tags)[-3:] == [FAILURES_TAG, SECONDS_TAG, SKIPPED_TAG]


def test_scalar_tags_of_a_minimal_result():
    # no seconds / skipped_samples in the result: no such tags; failures defaults to 0
    assert scalar_tags({"metrics": ["entropy"], "layers": {}, "model": {}}) == {FAILURES_TAG: 0.0}


@pytest.mark.parametrize("prefix", ["", "train/", "a/b/"])
def test_parse_tag_round_trips_every_built_tag(prefix):
    layer_names = {"blocks.0.mix": "blocks.0.mix", "root": "root", "model.self": "model.self", MODEL: MODEL}
    for tag in scalar_tags(RESULT):
        parsed = parse_tag(prefix + tag)
        assert parsed is not None, prefix + tag
        assert parsed.prefix == prefix
        if tag == FAILURES_TAG:
            assert parsed == ParsedTag(prefix, "failures")
        elif tag == SECONDS_TAG:
            assert parsed == ParsedTag(prefix, "seconds")
        elif tag == SKIPPED_TAG:
            assert parsed == ParsedTag(prefix, "skipped")
        else:
            _, metric, stat, layer = tag.split("/", 3)
            assert parsed == ParsedTag(prefix, "stat", metric, stat, layer_names[layer])
            # and back: the parts rebuild the tag
            assert f"{parsed.prefix}ess/{parsed.metric}/{parsed.stat}/{parsed.layer}" == prefix + tag


@pytest.mark.parametrize(
    "tag",
    [
        "loss",
        "train/loss",
        "ess/entropy/median/model",
        "ess_heads/entropy/blocks.0",
        "ess_profile/entropy",
        "esswatch/config",
        "ess/failures/extra",
        "xess/failures",
    ],
)
def test_parse_tag_rejects_other_tags(tag):
    assert parse_tag(tag) is None


def test_custom_scalars_layout_matches_the_built_tags():
    layout = custom_scalars_layout(["entropy", "tolerance"])
    charts = layout["esswatch"]
    tags = list(scalar_tags(RESULT))
    for prefix in ("", "train/", "a/b/"):
        covered = set()
        for title, (kind, regexes) in charts.items():
            assert kind == "Multiline"
            matched = {t for t in tags if any(re.match(rx, prefix + t) for rx in regexes)}
            covered |= matched
            if title == "failures":
                assert matched == {FAILURES_TAG}
            else:
                metric, stat = re.fullmatch(r"(\w+)-ESS (\w+), all layers", title).groups()
                assert stat in STATS
                assert matched == {t for t in tags if t.startswith(f"ess/{metric}/{stat}/")}, title
        assert covered == set(tags) - {SECONDS_TAG, SKIPPED_TAG}
    # one chart per metric and statistic, plus failures (ess/skipped has no chart: every chart
    # of the layout must have data in every run, and runs written before it existed lack it)
    assert len(charts) == 2 * len(STATS) + 1
    # the regexes do not match a tag that merely contains the scheme inside a component
    assert not any(re.match(rx, "xess/entropy/avg/model") for _, rxs in charts.values() for rx in rxs)
