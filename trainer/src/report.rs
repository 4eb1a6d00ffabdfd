//! `report.html`: the plots of a consolidation run, from its `report.json`
//! — loss curve, rehearsal divergence, priority distribution, the editing
//! figures (efficacy, generalisation, locality) before and after, the
//! paraphrases the night wrote, the never-taught answers that changed, and
//! examples per day — as one
//! self-contained HTML file with inline SVG.
//!
//! Principal function: [`render`].

use std::fmt::Write;

use serde_json::Value;

const W: f64 = 560.0;
const H: f64 = 220.0;
const PAD: f64 = 36.0;

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

/// A line plot of `ys` against their index.
fn line_plot(title: &str, ys: &[f64]) -> String {
    let max = ys.iter().cloned().fold(f64::MIN, f64::max).max(1e-9);
    let n = ys.len().max(2) as f64 - 1.0;
    let points: Vec<String> = ys
        .iter()
        .enumerate()
        .map(|(i, y)| format!("{:.1},{:.1}", PAD + i as f64 / n * (W - 2.0 * PAD), H - PAD - y / max * (H - 2.0 * PAD)))
        .collect();
    format!(
        "<h2>{title}</h2><svg width='{W}' height='{H}'><rect x='{PAD}' y='{PAD}' width='{}' height='{}' fill='none' stroke='#ccc'/>\
         <polyline fill='none' stroke='#2a6' stroke-width='1.5' points='{}'/>\
         <text x='4' y='{PAD}' font-size='11'>{max:.2}</text><text x='4' y='{}' font-size='11'>0</text>\
         <text x='{PAD}' y='{}' font-size='11'>step 1</text><text x='{}' y='{}' font-size='11'>step {}</text></svg>",
        W - 2.0 * PAD,
        H - 2.0 * PAD,
        points.join(" "),
        H - PAD,
        H - 8.0,
        W - PAD - 50.0,
        H - 8.0,
        ys.len()
    )
}

/// A bar chart of labelled values.
fn bar_plot(title: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let width = (W - 2.0 * PAD) / bars.len().max(1) as f64;
    let mut svg = format!("<h2>{title}</h2><svg width='{W}' height='{H}'>");
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = v / max * (H - 2.0 * PAD);
        let x = PAD + i as f64 * width;
        let _ = write!(
            svg,
            "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{h:.1}' fill='#36c'/>\
             <text x='{:.1}' y='{:.1}' font-size='10'>{v:.3}</text><text x='{:.1}' y='{}' font-size='10'>{label}</text>",
            x + 2.0,
            H - PAD - h,
            width - 4.0,
            x + 2.0,
            H - PAD - h - 3.0,
            x + 2.0,
            H - PAD + 12.0
        );
    }
    svg + "</svg>"
}

/// `text` with HTML's special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&#39;")
}

/// Renders `report` (the content of `report.json`) as HTML.
pub fn render(report: &Value) -> String {
    let mut html = String::from("<!doctype html><meta charset='utf-8'><title>nocturne consolidation report</title><body style='font-family:sans-serif'>");
    let _ = write!(
        html,
        "<h1>Consolidation report</h1><p>adapter <code>{}</code> — <b>{}</b>: {}</p>\
         <p>rank {}, alpha {}, MAS λ {}, rehearsal μ {}; {} steps in {:.1} s ({:.0} tokens/s); adapter weights {} bytes ({})</p>",
        report["adapter"].as_str().unwrap_or("?"),
        if report["published"].as_bool() == Some(true) { "published" } else { "not published" },
        report["decision"].as_str().unwrap_or(""),
        report["rank"],
        report["alpha"],
        report["mas_lambda"],
        report["rehearsal_weight"],
        numbers(&report["losses"]).len(),
        report["train_seconds"].as_f64().unwrap_or(0.0),
        report["tokens_per_second"].as_f64().unwrap_or(0.0),
        report["adapter_bytes"],
        report["precision"].as_str().unwrap_or("f16")
    );
    let r = &report["replay"];
    let _ = write!(
        html,
        "<p>{} interactions, {} feedback records: {} corrections and {} approved replies trained on; {} negative-only and {} unrated kept out; {} feedback records about unknown interactions.</p>",
        r["interactions"], r["feedback"], r["corrected"], r["approved"], r["negative_only"], r["unrated"], r["orphan_feedback"]
    );
    html += &line_plot("Task loss per step", &numbers(&report["losses"]));
    let divergences = numbers(&report["divergences"]);
    if !divergences.is_empty() {
        html += &line_plot("Rehearsal divergence KL(start ‖ adapted) per step, nats/token", &divergences);
    }
    let priorities = numbers(&report["priorities"]);
    let mut bins = [0usize; 10];
    for p in &priorities {
        bins[((p * 10.0) as usize).min(9)] += 1;
    }
    let bins: Vec<(String, f64)> = bins.iter().enumerate().map(|(i, c)| (format!("{:.1}", i as f64 / 10.0), *c as f64)).collect();
    html += &bar_plot("Priority distribution (examples per 0.1 bin)", &bins);
    let (b, a) = (&report["before"], &report["after"]);
    let figure = |v: &Value, name: &str| v[name].as_f64().unwrap_or(0.0);
    let mut eval = vec![("efficacy before".to_string(), figure(b, "efficacy")), ("efficacy after".to_string(), figure(a, "efficacy"))];
    if let (Some(gb), Some(ga)) = (b["generalisation"].as_f64(), a["generalisation"].as_f64()) {
        eval.push(("generalisation before".into(), gb));
        eval.push(("generalisation after".into(), ga));
    }
    eval.push(("locality (gate)".into(), figure(a, "locality")));
    eval.push(("locality (report)".into(), report["locality_report"].as_f64().unwrap_or(0.0)));
    html += &bar_plot("Efficacy, generalisation to unseen paraphrases, and locality (answers unchanged), before and after", &eval);
    if let Some(changes) = report["locality_changes"].as_array().filter(|c| !c.is_empty()) {
        let _ = write!(html, "<h2>Never-taught answers that changed ({})</h2><table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>part</th><th>question</th><th>before</th><th>after</th></tr>", changes.len());
        for c in changes {
            let field = |name: &str| escape(c[name].as_str().unwrap_or(""));
            let _ = write!(html, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", field("part"), field("question"), field("before"), field("after"));
        }
        html += "</table>";
    }
    if let Some(written) = report["paraphrases"].as_array().filter(|w| !w.is_empty()) {
        html += "<h2>Paraphrases the night wrote</h2><table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>question</th><th>trained on</th><th>framings (trained on)</th><th>gate (never trained on)</th></tr>";
        for p in written {
            let listed = |key: &str| p[key].as_array().into_iter().flatten().filter_map(Value::as_str).map(escape).collect::<Vec<String>>().join("<br>");
            let _ = write!(html, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", escape(p["question"].as_str().unwrap_or("")), listed("trained"), listed("framings"), escape(p["gate"].as_str().unwrap_or("—")));
        }
        html += "</table>";
    }
    let ppl = [
        ("retention before".to_string(), b["retention_perplexity"].as_f64().unwrap_or(0.0)),
        ("retention after".to_string(), a["retention_perplexity"].as_f64().unwrap_or(0.0)),
    ];
    html += &bar_plot("Retention perplexity before and after", &ppl);
    let days: Vec<(String, f64)> = report["examples_per_day"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| Some((d[0].as_str()?.to_string(), d[1].as_f64()?))).collect())
        .unwrap_or_default();
    html += &bar_plot("Examples with feedback per day", &days);
    html + "</body>"
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_plot() {
        let report = serde_json::json!({
            "adapter": "ab", "published": true, "decision": "ok", "rank": 8, "alpha": 16.0, "mas_lambda": 0.5,
            "losses": [3.0, 2.0, 1.0], "divergences": [0.0, 0.01, 0.02], "train_seconds": 1.0, "tokens_per_second": 10.0, "adapter_bytes": 100,
            "replay": {"interactions": 3, "feedback": 3, "corrected": 2, "approved": 1, "negative_only": 0, "unrated": 0, "orphan_feedback": 0},
            "priorities": [0.3, 0.9, 0.95],
            "before": {"efficacy": 0.0, "generalisation": 0.0, "locality": 1.0, "retention_perplexity": 10.0},
            "after": {"efficacy": 1.0, "generalisation": 0.5, "locality": 0.96, "retention_perplexity": 10.1},
            "locality_report": 0.92,
            "locality_changes": [{"part": "gate", "question": "2+2?", "before": "4, of course.", "after": "5 & more."}],
            "paraphrases": [{"question": "Who <b>is</b> it?", "trained": ["Who's that?"], "framings": ["Hey, who <b>is</b> it?"], "gate": "Which one is it?"}],
            "examples_per_day": [["2026-11-21", 3]]
        });
        let html = super::render(&report);
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(html.contains("polyline") && html.contains("2026-11-21") && html.contains("published"));
        assert!(html.contains("generalisation after") && html.contains("locality (report)"));
        assert!(html.contains("answers that changed (1)") && html.contains("5 &amp; more."));
        // The paraphrase table, its text escaped.
        assert!(html.contains("Who &lt;b&gt;is&lt;/b&gt; it?") && html.contains("Who&#39;s that?") && html.contains("Which one is it?"));
        assert!(html.contains("Hey, who &lt;b&gt;is&lt;/b&gt; it?"));
    }
}
