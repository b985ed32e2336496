//! Combining metrics and choosing one preference pair per prompt (AGFSync
//! sections 4 and 5).
//!
//! Raw metrics live on different scales (CLIP score about 20..35, aesthetic
//! about 1..10, VQA 0..100), so by default each metric is normalised within
//! a prompt's candidates before weighting; `raw` reproduces the public
//! code's plain weighted sum. Winner = argmax of the combined score, loser =
//! argmin; equal scores (a tie) and gaps below `min_gap` give no pair. Every
//! decision keeps its reason: each candidate's raw and normalised metrics
//! and combined score.

use std::collections::BTreeMap;

use serde_json::json;

use agfsync_store::PairRecord;

use crate::config::Normalise;

/// The metrics of one candidate (`None`: the scorer failed on it).
pub type CandidateMetrics = BTreeMap<String, Option<f64>>;

/// Normalises `values` within the group.
pub fn normalise(values: &[f64], how: Normalise) -> Vec<f64> {
    let n = values.len() as f64;
    match how {
        Normalise::Raw => values.to_vec(),
        Normalise::Zscore => {
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let std = var.sqrt();
            if std <= f64::EPSILON * mean.abs().max(1.0) {
                vec![0.0; values.len()]
            } else {
                values.iter().map(|v| (v - mean) / std).collect()
            }
        }
        Normalise::Minmax => {
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
                vec![0.0; values.len()]
            } else {
                values.iter().map(|v| (v - lo) / (hi - lo)).collect()
            }
        }
    }
}

/// Chooses the pair of one prompt from its candidates' metrics
/// (`(candidate index, metrics)`, in index order).
pub fn choose_pair(
    pid: &str,
    candidates: &[(i64, CandidateMetrics)],
    weights: &BTreeMap<String, f64>,
    how: Normalise,
    min_gap: f64,
) -> PairRecord {
    let used: Vec<(&String, f64)> = weights
        .iter()
        .filter(|(_, w)| **w != 0.0)
        .map(|(m, w)| (m, *w))
        .collect();
    // Candidates with every weighted metric; the rest cannot be ranked.
    let complete: Vec<&(i64, CandidateMetrics)> = candidates
        .iter()
        .filter(|(_, m)| {
            used.iter()
                .all(|(k, _)| matches!(m.get(*k), Some(Some(v)) if v.is_finite()))
        })
        .collect();
    let excluded: Vec<i64> = candidates
        .iter()
        .filter(|c| !complete.iter().any(|k| k.0 == c.0))
        .map(|c| c.0)
        .collect();
    let mut record = PairRecord {
        pid: pid.to_string(),
        status: String::new(),
        winner: None,
        loser: None,
        winner_score: None,
        loser_score: None,
        reason: serde_json::Value::Null,
    };
    if complete.len() < 2 {
        record.status = if candidates.len() < 2 {
            "too_few_candidates".into()
        } else {
            "missing_scores".into()
        };
        record.reason = json!({
            "weights": weights,
            "normalise": how,
            "excluded_for_missing_scores": excluded,
        });
        return record;
    }
    let mut normalised: BTreeMap<&String, Vec<f64>> = BTreeMap::new();
    for (m, _) in &used {
        let raw: Vec<f64> = complete
            .iter()
            .map(|(_, ms)| ms.get(*m).copied().flatten().unwrap_or(f64::NAN))
            .collect();
        normalised.insert(m, normalise(&raw, how));
    }
    let combined: Vec<f64> = (0..complete.len())
        .map(|i| used.iter().map(|(m, w)| w * normalised[m][i]).sum())
        .collect();
    // First index wins ties for the maximum, last for the minimum, so a
    // group of equal scores is reported as a tie below.
    let mut best = 0;
    let mut worst = 0;
    for i in 0..combined.len() {
        if combined[i] > combined[best] {
            best = i;
        }
        if combined[i] <= combined[worst] {
            worst = i;
        }
    }
    let per_candidate: Vec<serde_json::Value> = complete
        .iter()
        .enumerate()
        .map(|(i, (idx, ms))| {
            let norm: BTreeMap<&String, f64> =
                used.iter().map(|(m, _)| (*m, normalised[m][i])).collect();
            json!({ "candidate": idx, "raw": ms, "normalised": norm, "combined": combined[i] })
        })
        .collect();
    let gap = combined[best] - combined[worst];
    record.reason = json!({
        "weights": weights,
        "normalise": how,
        "min_gap": min_gap,
        "gap": gap,
        "candidates": per_candidate,
        "excluded_for_missing_scores": excluded,
    });
    record.winner_score = Some(combined[best]);
    record.loser_score = Some(combined[worst]);
    if gap <= 0.0 || best == worst {
        record.status = "tie".into();
    } else if gap < min_gap {
        record.status = "below_min_gap".into();
    } else {
        record.status = "pair".into();
        record.winner = Some(complete[best].0);
        record.loser = Some(complete[worst].0);
    }
    record
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn cand(idx: i64, clip: Option<f64>, aes: Option<f64>) -> (i64, CandidateMetrics) {
        let mut m = CandidateMetrics::new();
        m.insert("clip".into(), clip);
        m.insert("aesthetic".into(), aes);
        (idx, m)
    }

    fn weights() -> BTreeMap<String, f64> {
        [("clip".to_string(), 0.85), ("aesthetic".to_string(), 0.15)]
            .into_iter()
            .collect()
    }

    #[test]
    fn zscore_lets_the_small_scale_metric_count() {
        // Equal weights: a raw sum lets CLIP (spread of 10) swamp aesthetic
        // (spread of 8 on a smaller scale); z-scores weigh them evenly.
        let c = vec![
            cand(0, Some(20.0), Some(9.0)),
            cand(1, Some(30.0), Some(1.0)),
            cand(2, Some(25.0), Some(6.0)),
        ];
        let w: BTreeMap<String, f64> = [("clip".to_string(), 0.5), ("aesthetic".to_string(), 0.5)]
            .into_iter()
            .collect();
        let raw = choose_pair("p", &c, &w, Normalise::Raw, 0.0);
        assert_eq!((raw.winner, raw.loser), (Some(1), Some(0)));
        let z = choose_pair("p", &c, &w, Normalise::Zscore, 0.0);
        assert_eq!((z.winner, z.loser), (Some(2), Some(0)));
        assert_eq!(z.status, "pair");
        assert_eq!(z.reason["candidates"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn equal_scores_are_a_tie_and_small_gaps_are_dropped() {
        let c = vec![
            cand(0, Some(20.0), Some(5.0)),
            cand(1, Some(20.0), Some(5.0)),
        ];
        assert_eq!(
            choose_pair("p", &c, &weights(), Normalise::Zscore, 0.0).status,
            "tie"
        );
        let c = vec![
            cand(0, Some(20.0), Some(5.0)),
            cand(1, Some(20.1), Some(5.0)),
        ];
        let r = choose_pair("p", &c, &weights(), Normalise::Raw, 1.0);
        assert_eq!(r.status, "below_min_gap");
        assert_eq!(r.winner, None);
    }

    #[test]
    fn candidates_missing_a_weighted_metric_are_excluded() {
        let c = vec![
            cand(0, Some(20.0), None),
            cand(1, Some(25.0), Some(5.0)),
            cand(2, Some(21.0), Some(4.0)),
        ];
        let r = choose_pair("p", &c, &weights(), Normalise::Minmax, 0.0);
        assert_eq!((r.winner, r.loser), (Some(1), Some(2)));
        assert_eq!(r.reason["excluded_for_missing_scores"], json!([0]));
        let r = choose_pair("p", &c[..2], &weights(), Normalise::Minmax, 0.0);
        assert_eq!(r.status, "missing_scores");
    }

    #[test]
    fn normalisations() {
        assert_eq!(normalise(&[1.0, 3.0], Normalise::Minmax), vec![0.0, 1.0]);
        assert_eq!(normalise(&[1.0, 3.0], Normalise::Zscore), vec![-1.0, 1.0]);
        assert_eq!(normalise(&[2.0, 2.0], Normalise::Zscore), vec![0.0, 0.0]);
    }
}
