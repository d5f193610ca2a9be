"""The serving benchmark's client-side metrics (benchmarks/serving_client_metrics.py), as vLLM's
benchmark_serving defines them, on hand-made request records whose answers are known."""

import pytest

from benchmarks.serving_client_metrics import RequestRecord, median_over_rounds, percentiles, summarize


def test_percentiles_interpolate_and_empty_is_none():
    assert percentiles(list(range(101))) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_summary_counts_completed_requests_and_goodput_uses_the_mean_gap():
    fast = RequestRecord(ok=True, ttft_s=0.2, chunk_gaps_s=(0.05, 0.05, 0.05), e2e_s=0.35, output_tokens=4)
    # One slow gap (0.3 s) but a mean gap of 0.09 s: meets the 100 ms ITL limit, as vLLM's TPOT does.
    bursty = RequestRecord(ok=True, ttft_s=0.5, chunk_gaps_s=(0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                           e2e_s=1.4, output_tokens=11)
    late = RequestRecord(ok=True, ttft_s=1.5, chunk_gaps_s=(0.01,), e2e_s=1.51, output_tokens=2)
    one_token = RequestRecord(ok=True, ttft_s=0.1, e2e_s=0.1, output_tokens=1)  # no gap: meets the ITL limit
    failed = RequestRecord(ok=False, error="APIConnectionError: refused")
    s = summarize([fast, bursty, late, one_token, failed], duration_s=2.0, slo_ttft_s=1.0, slo_itl_s=0.1)
    assert (s["requests"], s["completed"], s["errors"], s["first_errors"]) == (5, 4, 1, ["APIConnectionError: refused"])
    assert s["output_tokens"] == 18 and s["output_tokens_per_s"] == 9.0 and s["requests_per_s"] == 2.0
    assert s["tokens_per_chunk"] == 18 / 18  # 4 + 11 + 2 + 1 chunks for as many tokens
    assert s["goodput_per_s"] == 1.5  # fast, bursty, one_token; late misses the TTFT limit
    assert bursty.tpot_s == pytest.approx(0.09)
    assert s["ttft_s"]["p50"] == pytest.approx(0.35)
    assert s["itl_s"]["p99"] == pytest.approx(0.3, abs=0.05)  # every gap is a sample: the slow one shows
    assert s["e2e_s"]["p50"] == pytest.approx(0.875)


def test_a_unary_load_counts_in_throughput_and_e2e_only():
    # Unary: the whole output in one response, so no first chunk, no gaps, and no SLO on them.
    whole = [RequestRecord(ok=True, ttft_s=e2e, e2e_s=e2e, output_tokens=64, streamed=False) for e2e in (1.0, 2.0)]
    s = summarize(whole + [RequestRecord(ok=False, error="boom", streamed=False)], duration_s=2.0, slo_ttft_s=1.0,
                  slo_itl_s=0.1)
    assert (s["completed"], s["errors"], s["output_tokens_per_s"], s["requests_per_s"]) == (2, 1, 64.0, 1.0)
    assert s["e2e_s"]["p50"] == pytest.approx(1.5)
    assert s["goodput_per_s"] is None and s["tokens_per_chunk"] is None
    assert s["ttft_s"] == s["itl_s"] == s["tpot_s"] == {"p50": None, "p90": None, "p99": None}
    merged = median_over_rounds([s, s])
    assert merged["goodput_per_s"] is None and merged["output_tokens_per_s"] == 64.0


def test_median_over_rounds_per_number_errors_summed_memory_highest():
    def round_summary(tokens_per_s, ttft_p99, errors, rss):
        return {"requests": 10, "errors": errors, "first_errors": [f"e{errors}"] if errors else [],
                "output_tokens_per_s": tokens_per_s, "ttft_s": {"p50": 0.1, "p99": ttft_p99},
                "peak_rss_mib": rss, "pss_mib": rss / 2}

    merged = median_over_rounds([round_summary(100, 0.5, 0, 900), round_summary(300, None, 2, 800),
                                 round_summary(200, 0.7, 1, 1000)])
    assert merged["output_tokens_per_s"] == 200 and merged["ttft_s"] == {"p50": 0.1, "p99": 0.7}
    assert (merged["errors_total"], merged["requests_total"], merged["rounds"]) == (3, 30, 3)
    assert merged["first_errors"] == ["e1", "e2"]
    assert (merged["peak_rss_mib"], merged["pss_mib"]) == (1000, 500)
