"""docs/scaling.md stays true: its figures are bench/results.json's (the run bench/RESULTS.md
shows), its worked examples follow its formula, and its prometheus-adapter alternative (a rule
and a HorizontalPodAutoscaler) validates and scales on the same gauge and target as
deploy/k8s/scaledobject.yaml."""
import json
import math
import os
import re

import kubernetes_validate
import pytest
import yaml

from support import ROOT, k8s_objects, read_text

DOC = os.path.join(ROOT, "docs", "scaling.md")
UTILISATION = 0.7


@pytest.fixture(scope="module")
def results():
    with open(os.path.join(ROOT, "bench", "results.json")) as f:
        return json.load(f)


def _table_rows():
    """{log2 rows: (alone s, steady/s, steady/min, per core, RSS MiB)} of the doc's table."""
    rows = {}
    pattern = (r"^\| 2\^(\d+) rows[^|]*\| ([\d.]+) s \| ([\d.]+) \(([\d.]+)/min\) \| ([\d.]+) \| (\d+) MiB \|$")
    for m in re.finditer(pattern, read_text(DOC), re.M):
        rows[int(m.group(1))] = tuple(float(x) for x in m.groups()[1:])
    return rows


def _yaml_blocks():
    return [yaml.safe_load(block) for block in re.findall(r"^```yaml\n(.*?)^```", read_text(DOC), re.M | re.S)]


def test_the_table_is_the_benchmark_run(results):
    rows = _table_rows()
    assert sorted(rows) == [12, 15, 18]
    cores = int(results["machine"]["cores"])
    assert cores == 2 and "2 cores" in read_text(DOC)
    for c in results["concurrency"]:
        runs = {(r["limit"], r["clients"]): r for r in c["runs"]}
        alone, per_second, per_minute, per_core, rss = rows[c["log"]]
        assert alone == round(runs[("scheduler", 1)]["latency"]["p50"], 2)
        steady = runs[("scheduler", 8)]["steady_per_min"]
        assert per_minute == round(steady, 1)
        assert per_second == float(f"{steady / 60:.3g}")
        assert per_core == float(f"{steady / 60 / cores:.3g}")
        [size] = [s for s in results["sizes"] if s["log"] == c["log"]]
        assert rss == round(size["floor_rss"][0] / 2 ** 20)


def test_the_worked_examples_follow_the_formula():
    rows = _table_rows()
    examples = re.findall(r"^- ([\d.]+) proofs?/s [^:]*: ceil\(([\d.]+) / \(([\d.]+) × (\d+) × ([\d.]+)\)\) = (\d+) "
                          r"replicas, (\d+) cores\.$", read_text(DOC), re.M)
    assert len(examples) == 3
    per_core = {row[3] for row in rows.values()}
    for rate, rate_again, core_rate, cores, utilisation, replicas, total in examples:
        assert rate == rate_again and float(core_rate) in per_core and float(utilisation) == UTILISATION
        assert int(replicas) == math.ceil(float(rate) / (float(core_rate) * int(cores) * float(utilisation)))
        assert int(total) == int(replicas) * int(cores)


@pytest.mark.parametrize("version", ("1.29.0", kubernetes_validate.latest_version()))
def test_the_prometheus_adapter_alternative_matches_the_scaledobject(version):
    rule, hpa = _yaml_blocks()
    [rule] = rule
    scaled = k8s_objects()["ScaledObject"]["spec"]
    trigger = scaled["triggers"][0]["metadata"]
    gauge = re.match(r"sum\((\w+)\{", trigger["query"]).group(1)
    assert rule["seriesQuery"].startswith(gauge + "{") and rule["name"]["as"] == gauge
    assert re.fullmatch(rule["name"]["matches"], gauge)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].startswith("sum(")  # a pod's workers are summed already; sum over series
    kubernetes_validate.validate(hpa, version, strict=True)
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == gauge
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": trigger["threshold"]}
    assert hpa["spec"]["scaleTargetRef"] == scaled["scaleTargetRef"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (scaled["minReplicaCount"],
                                                                      scaled["maxReplicaCount"])
