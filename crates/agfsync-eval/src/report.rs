//! The evaluation report: one self-contained HTML file (inline CSS, inline
//! SVG charts, images as `data:` URLs, no script, no external URL) that
//! opens offline in any browser and can be mailed as is.
//!
//! Sections: a summary table (per metric: each model's mean, the paired
//! difference with its bootstrap interval and the win rate), a chart per
//! metric with the intervals, TIFA accuracy per element type, HPSv2 per
//! style, the DPO training curves, and image grids of the models side by
//! side for the same prompt and seed with the scores under each image.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::stats::PairedComparison;

/// One metric's results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetricSummary {
    /// Metric name.
    pub metric: String,
    /// Scorer version (method, model identity, preprocessing).
    pub version: String,
    /// Model -> mean over prompts.
    pub means: BTreeMap<String, f64>,
    /// Model -> prompts scored.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// The paired comparison of the second model against the first.
    pub comparison: Option<PairedComparison>,
}

/// One row of the image grid: a prompt and seed, and each model's image.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GridRow {
    /// The prompt.
    pub prompt: String,
    /// The seed both models used.
    pub seed: u64,
    /// Per model: PNG bytes and the scores of that image.
    pub images: Vec<(String, Vec<u8>, BTreeMap<String, f64>)>,
}

/// One step of the training curves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainPoint {
    /// Optimizer step.
    pub step: f64,
    /// DPO loss.
    pub loss: f64,
    /// Implicit accuracy.
    pub accuracy: Option<f64>,
}

/// Everything the report shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Title (the run's name).
    pub title: String,
    /// Models compared, in order (the first is the baseline).
    pub models: Vec<String>,
    /// Per-metric summaries.
    pub metrics: Vec<MetricSummary>,
    /// Model -> element type -> TIFA accuracy.
    pub tifa_by_type: BTreeMap<String, BTreeMap<String, f64>>,
    /// Model -> style -> (mean, std over chunks) of HPSv2.
    pub hps_by_style: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
    /// The DPO training curve.
    pub training: Vec<TrainPoint>,
    /// Image grid.
    pub grid: Vec<GridRow>,
    /// Remarks (versions, settings).
    pub notes: Vec<String>,
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648, padded), for `data:` URLs.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const COLORS: [&str; 6] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
];

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A bar's value and optional error bar, by (group, series).
type BarValue<'a> = dyn Fn(usize, usize) -> Option<(f64, Option<(f64, f64)>)> + 'a;

/// A grouped bar chart: groups (x) × series (bars), optional error bars.
fn bar_chart(title: &str, groups: &[String], series: &[String], value: &BarValue<'_>) -> String {
    let w = (120.0 + 90.0 * (groups.len() * series.len()) as f64).clamp(260.0, 900.0);
    let (h, left, bottom, top) = (220.0, 50.0, 50.0, 30.0);
    let mut lo: f64 = 0.0;
    let mut hi: f64 = 0.0;
    for g in 0..groups.len() {
        for s in 0..series.len() {
            if let Some((v, e)) = value(g, s) {
                lo = lo.min(v);
                hi = hi.max(v);
                if let Some((a, b)) = e {
                    lo = lo.min(a);
                    hi = hi.max(b);
                }
            }
        }
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let plot_h = h - bottom - top;
    let y = |v: f64| top + plot_h * (hi - v) / (hi - lo);
    let gw = (w - left - 10.0) / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{left}\" y=\"18\" class=\"ct\">{t}</text>",
        t = escape(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#888\"/>\
         <text x=\"{}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"end\">{}</text>",
        w - 10.0,
        left - 4.0,
        y(hi) + 4.0,
        fmt(hi),
        left - 4.0,
        y(lo) + 4.0,
        fmt(lo),
        y0 = y(0.0_f64.clamp(lo, hi)),
    );
    for (g, name) in groups.iter().enumerate() {
        let gx = left + g as f64 * gw + gw * 0.1;
        for s in 0..series.len() {
            let Some((v, err)) = value(g, s) else {
                continue;
            };
            let x = gx + s as f64 * bw;
            let (y1, y2) = (
                y(v.max(0.0_f64.clamp(lo, hi))),
                y(v.min(0.0_f64.clamp(lo, hi))),
            );
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                bw * 0.9,
                (y2 - y1).max(0.5),
                COLORS[s % COLORS.len()],
                escape(&series[s]),
                fmt(v)
            );
            if let Some((a, b)) = err {
                let cx = x + bw * 0.45;
                let _ = write!(
                    svg,
                    "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#222\"/>",
                    y(a),
                    y(b)
                );
            }
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"middle\">{}</text>",
            left + g as f64 * gw + gw / 2.0,
            h - bottom + 16.0,
            escape(name)
        );
    }
    for (s, name) in series.iter().enumerate() {
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"ax\">{}</text>",
            left + s as f64 * 120.0,
            h - 18.0,
            COLORS[s % COLORS.len()],
            left + s as f64 * 120.0 + 14.0,
            h - 9.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A line chart of `(x, y)` series.
fn line_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, left, bottom, top) = (440.0, 200.0, 50.0, 40.0, 30.0);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return String::new();
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| left + (w - left - 10.0) * (x - x0) / (x1 - x0);
    let py = |y: f64| top + (h - bottom - top) * (y1 - y) / (y1 - y0);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\">\
         <text x=\"{left}\" y=\"18\" class=\"ct\">{t}</text>\
         <text x=\"{}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"end\">{}</text>\
         <text x=\"{left}\" y=\"{:.1}\" class=\"ax\">step {}</text>\
         <text x=\"{}\" y=\"{:.1}\" class=\"ax\" text-anchor=\"end\">step {}</text>",
        left - 4.0,
        py(y1) + 4.0,
        fmt(y1),
        left - 4.0,
        py(y0) + 4.0,
        fmt(y0),
        h - bottom + 16.0,
        x0.round(),
        w - 10.0,
        h - bottom + 16.0,
        x1.round(),
        t = escape(title)
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let path: Vec<String> = p
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"ax\" fill=\"{c}\">{}</text>",
            path.join(" "),
            left + i as f64 * 140.0,
            h - 6.0,
            escape(name),
            c = COLORS[i % COLORS.len()]
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Renders the report as one self-contained HTML document.
pub fn render_html(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}\
         .better{{color:#1a7f37;font-weight:600}}.worse{{color:#b42318}}\
         .ct{{font-size:14px;font-weight:600}}.ax{{font-size:11px}}\
         .grid{{display:flex;flex-wrap:wrap;gap:12px}}.cell{{text-align:center;font-size:12px}}\
         .cell img{{width:192px;height:192px;image-rendering:pixelated;border:1px solid #ccc}}\
         .charts{{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}}\
         .row{{border-top:1px solid #ddd;padding:8px 0}}.note{{color:#666;font-size:12px}}\
         </style></head><body><h1>{t}</h1>",
        t = escape(&r.title)
    );
    let base = r.models.first().cloned().unwrap_or_default();
    let other = r.models.get(1).cloned().unwrap_or_default();
    h.push_str("<h2>Summary</h2><table><tr><th>metric</th>");
    for m in &r.models {
        let _ = write!(h, "<th>{}</th>", escape(m));
    }
    let _ = write!(
        h,
        "<th>{} − {} (95% CI)</th><th>win rate</th><th>version</th></tr>",
        escape(&other),
        escape(&base)
    );
    for m in &r.metrics {
        let _ = write!(h, "<tr><td>{}</td>", escape(&m.metric));
        for model in &r.models {
            let _ = write!(
                h,
                "<td>{}</td>",
                m.means.get(model).map_or("–".into(), |v| fmt(*v))
            );
        }
        match &m.comparison {
            Some(c) => {
                let class = if c.ci_low > 0.0 {
                    "better"
                } else if c.ci_high < 0.0 {
                    "worse"
                } else {
                    ""
                };
                let _ = write!(
                    h,
                    "<td class=\"{class}\">{} [{}, {}]</td><td>{:.0}%</td>",
                    fmt(c.mean_diff),
                    fmt(c.ci_low),
                    fmt(c.ci_high),
                    100.0 * c.win_rate
                );
            }
            None => h.push_str("<td>–</td><td>–</td>"),
        }
        let _ = write!(h, "<td class=\"note\">{}</td></tr>", escape(&m.version));
    }
    h.push_str("</table>");
    if !r.metrics.is_empty() {
        h.push_str("<h2>Metrics</h2><div class=\"charts\">");
        for m in &r.metrics {
            let groups = vec![m.metric.clone()];
            let chart = bar_chart(&m.metric, &groups, &r.models, &|_, s| {
                let v = *m.means.get(&r.models[s])?;
                let err = match (&m.comparison, s) {
                    (Some(c), 1) => Some((c.mean_a + c.ci_low, c.mean_a + c.ci_high)),
                    _ => None,
                };
                Some((v, err))
            });
            h.push_str(&chart);
        }
        h.push_str("</div><p class=\"note\">Whiskers: the second model's mean shifted by the bootstrap interval of the paired difference.</p>");
    }
    if !r.tifa_by_type.is_empty() {
        let types: Vec<String> = r
            .tifa_by_type
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        h.push_str("<h2>TIFA by element type</h2>");
        h.push_str(&bar_chart("TIFA accuracy", &types, &r.models, &|g, s| {
            Some((*r.tifa_by_type.get(&r.models[s])?.get(&types[g])?, None))
        }));
    }
    if !r.hps_by_style.is_empty() {
        let styles: Vec<String> = r
            .hps_by_style
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        h.push_str("<h2>HPSv2 by style</h2>");
        h.push_str(&bar_chart(
            "HPSv2 (mean ± std over chunks)",
            &styles,
            &r.models,
            &|g, s| {
                let (m, sd) = *r.hps_by_style.get(&r.models[s])?.get(&styles[g])?;
                Some((m, Some((m - sd, m + sd))))
            },
        ));
    }
    if !r.training.is_empty() {
        h.push_str("<h2>Diffusion-DPO training</h2><div class=\"charts\">");
        let loss: Vec<(f64, f64)> = r.training.iter().map(|p| (p.step, p.loss)).collect();
        h.push_str(&line_chart("loss", &[("loss".into(), loss)]));
        let acc: Vec<(f64, f64)> = r
            .training
            .iter()
            .filter_map(|p| Some((p.step, p.accuracy?)))
            .collect();
        if !acc.is_empty() {
            h.push_str(&line_chart(
                "implicit accuracy",
                &[("accuracy".into(), acc)],
            ));
        }
    }
    if !r.grid.is_empty() {
        h.push_str("<h2>Images (same prompt and seed)</h2>");
        for row in &r.grid {
            let _ = write!(
                h,
                "<div class=\"row\"><div>{} <span class=\"note\">seed {}</span></div><div class=\"grid\">",
                escape(&row.prompt),
                row.seed
            );
            for (model, png, scores) in &row.images {
                let s: Vec<String> = scores
                    .iter()
                    .map(|(k, v)| format!("{} {}", escape(k), fmt(*v)))
                    .collect();
                let _ = write!(
                    h,
                    "<div class=\"cell\"><img alt=\"{m}\" src=\"data:image/png;base64,{}\"><div><b>{m}</b></div><div>{}</div></div>",
                    base64(png),
                    s.join(" · "),
                    m = escape(model)
                );
            }
            h.push_str("</div></div>");
        }
    }
    if !r.notes.is_empty() {
        h.push_str("<h2>Notes</h2><ul>");
        for n in &r.notes {
            let _ = write!(h, "<li class=\"note\">{}</li>", escape(n));
        }
        h.push_str("</ul>");
    }
    h.push_str("<p class=\"note\">Made by agfsync.</p></body></html>\n");
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn report_holds_every_image_and_chart_and_no_external_url() {
        let mut r = Report {
            title: "run <x>".into(),
            models: vec!["base".into(), "tuned".into()],
            ..Report::default()
        };
        r.metrics.push(MetricSummary {
            metric: "clip".into(),
            version: "v".into(),
            means: [("base".to_string(), 20.0), ("tuned".to_string(), 21.0)]
                .into_iter()
                .collect(),
            comparison: Some(
                crate::stats::paired_bootstrap(&[1.0, 2.0], &[2.0, 3.0], 50, 0.95, 0).unwrap(),
            ),
            ..MetricSummary::default()
        });
        r.tifa_by_type.insert(
            "base".into(),
            [("color".to_string(), 0.5)].into_iter().collect(),
        );
        r.hps_by_style.insert(
            "base".into(),
            [("anime".to_string(), (25.0, 0.3))].into_iter().collect(),
        );
        r.training = (1..5)
            .map(|s| TrainPoint {
                step: s as f64,
                loss: 0.7 / s as f64,
                accuracy: Some(0.5),
            })
            .collect();
        r.grid.push(GridRow {
            prompt: "a \"cat\"".into(),
            seed: 3,
            images: vec![
                ("base".into(), vec![1, 2, 3], BTreeMap::new()),
                ("tuned".into(), vec![4, 5, 6], BTreeMap::new()),
            ],
        });
        let html = render_html(&r);
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("<script")
        );
        assert_eq!(html.matches("data:image/png;base64,").count(), 2);
        assert!(html.contains(&base64(&[4, 5, 6])));
        assert_eq!(
            html.matches("<svg").count(),
            5,
            "metric, TIFA, HPS, loss, accuracy charts"
        );
        assert!(html.contains("run &lt;x&gt;") && html.contains("a &quot;cat&quot;"));
        assert!(html.contains("class=\"better\""));
    }
}
