//! The loss chart: ONE self-contained HTML file (inline SVG, inline CSS, a few lines of JS for
//! hover read-outs; no network, no external fonts), as KFP shows an HTML artifact in an iframe.
//!
//! Panels: training loss per step with a smoothed line and the eval loss, learning rate, grad
//! norm, tokens/s; summary cards (first/final/min loss, eval loss, perplexity, steps, epochs,
//! duration, throughput). SVG is drawn here, so the page reads the same with scripts off.

use std::fmt::Write;

use lora_api::RunSummary;

use crate::report::{History, duration};

/// What the page says about the run besides the numbers.
#[derive(Debug, Clone, Default)]
pub struct ChartMeta {
    /// The base model, for the title.
    pub model: String,
    /// A few `name = value` settings shown under the title.
    pub settings: Vec<(String, String)>,
    /// The merged model's eval loss (the adapter folded into the weights as written).
    pub merged_eval_loss: Option<f64>,
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
    /// Thin and faded (raw data under a smoothed line).
    faint: bool,
    /// Draw dots at each point (eval loss).
    dots: bool,
}

/// The least y span, as a fraction of the largest |value| shown.
const MIN_SPAN: f64 = 0.25;

const PAD_L: f64 = 64.0;
const PAD_R: f64 = 18.0;
const PAD_T: f64 = 14.0;
const PAD_B: f64 = 34.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Round tick steps: 1, 2, 2.5, 5 x 10^k, about `n` ticks over `[lo, hi]`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut out = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// A tick label: compact, scientific for very small or large values.
fn label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace("e-0", "e-").replace(".0e", "e")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The smoothed loss at the start and the end of the run: the mean of the first and of the
/// last tenth of the logged steps (at least one, at most 20 steps each).
pub fn smoothed_ends(losses: &[f64]) -> (Option<f64>, Option<f64>) {
    let finite: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return (None, None);
    }
    let k = (finite.len() / 10).clamp(1, 20);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (Some(mean(&finite[..k])), Some(mean(&finite[finite.len() - k..])))
}

/// Debiased exponential moving average (TensorBoard's smoothing).
pub fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let (mut last, mut debias) = (0.0, 1.0);
    for v in values {
        last = last * weight + (1.0 - weight) * v;
        debias *= weight;
        out.push(last / (1.0 - debias));
    }
    out
}

/// One panel: axes, grid, the series, a legend. `id` links the hover script to the data.
/// `from_zero`: the y axis starts at 0 (rates, where a zoomed axis would exaggerate noise).
fn panel(id: &str, title: &str, y_title: &str, series: &[Series], (w, height): (f64, f64), x_max: f64, from_zero: bool) -> String {
    #[allow(non_snake_case)]
    let W = w;
    let mut svg = String::new();
    let finite: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let _ = write!(svg, r#"<section class="card panel"><header><h2>{}</h2><div class="legend">"#, esc(title));
    for s in series.iter().filter(|s| !s.points.is_empty() && series.len() > 1) {
        let _ = write!(svg, r#"<span><i style="background:{}"></i>{}</span>"#, s.color, esc(s.name));
    }
    svg.push_str("</div></header>");
    if finite.is_empty() {
        let _ = write!(svg, r#"<div class="empty">No data logged</div></section>"#);
        return svg;
    }
    let (mut y_lo, mut y_hi) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if (y_hi - y_lo).abs() < 1e-12 {
        let d = if y_hi == 0.0 { 1.0 } else { y_hi.abs() * 0.1 };
        y_lo -= d;
        y_hi += d;
    } else {
        let pad = (y_hi - y_lo) * 0.08;
        y_lo = if y_lo >= 0.0 && y_lo - pad < 0.0 { 0.0 } else { y_lo - pad };
        y_hi += pad;
    }
    if from_zero && y_lo > 0.0 {
        y_lo = 0.0;
    }
    // A span below a quarter of the values' size would draw noise as a cliff (a loss moving
    // 3.095 → 3.07 over a 3.07–3.095 axis): widen it around its middle, not below zero.
    let least = y_hi.abs().max(y_lo.abs()) * MIN_SPAN;
    if y_hi - y_lo < least {
        let mid = (y_hi + y_lo) / 2.0;
        let (lo, hi) = (mid - least / 2.0, mid + least / 2.0);
        (y_lo, y_hi) = if lo < 0.0 && y_lo >= 0.0 { (0.0, least) } else { (lo, hi) };
    }
    let x_lo = finite.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).clamp(0.0, 1.0);
    let x_hi = x_max.max(x_lo + 1.0);
    let (pw, ph) = (W - PAD_L - PAD_R, height - PAD_T - PAD_B);
    let sx = |x: f64| PAD_L + (x - x_lo) / (x_hi - x_lo) * pw;
    let sy = |y: f64| PAD_T + (1.0 - (y - y_lo) / (y_hi - y_lo)) * ph;
    let _ = write!(
        svg,
        r#"<svg id="{id}" viewBox="0 0 {W} {height}" role="img" aria-label="{}" data-x0="{x_lo}" data-x1="{x_hi}" data-l="{PAD_L}" data-w="{pw}">"#,
        esc(title)
    );
    for t in ticks(y_lo, y_hi, if height < 300.0 { 4 } else { 5 }) {
        let y = sy(t);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{PAD_L}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - PAD_R,
            PAD_L - 8.0,
            y + 4.0,
            label(t)
        );
    }
    let x_ticks = if W < 600.0 { 4 } else { 8 };
    for t in ticks(x_lo, x_hi, x_ticks).into_iter().filter(|t| t.fract() == 0.0) {
        let x = sx(t);
        let _ = write!(
            svg,
            r#"<line class="grid v" x1="{x:.1}" x2="{x:.1}" y1="{PAD_T}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            PAD_T + ph,
            PAD_T + ph + 18.0,
            label(t)
        );
    }
    let _ = write!(
        svg,
        r#"<line class="axis" x1="{PAD_L}" x2="{:.1}" y1="{:.1}" y2="{:.1}"/><text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">optimizer step</text><text class="axis-label" transform="translate(13 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        W - PAD_R,
        PAD_T + ph,
        PAD_T + ph,
        PAD_L + pw / 2.0,
        height - 4.0,
        PAD_T + ph / 2.0,
        esc(y_title)
    );
    for s in series {
        let pts: Vec<String> =
            s.points.iter().filter(|p| p.1.is_finite()).map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
        if pts.is_empty() {
            continue;
        }
        let (width, opacity) = if s.faint { (1.3, 0.6) } else { (2.4, 1.0) };
        if pts.len() == 1 || s.dots {
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap();
                let _ = write!(svg, r#"<circle cx="{x}" cy="{y}" r="4" fill="{}" stroke="white" stroke-width="1.5"/>"#, s.color);
            }
        }
        if pts.len() > 1 {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="{width}" stroke-opacity="{opacity}" stroke-linejoin="round" stroke-linecap="round" points="{}"/>"#,
                s.color,
                pts.join(" ")
            );
        }
    }
    // Values on hover without scripts: an invisible target with a <title> per point (at most
    // HOVER_POINTS per series, evenly spaced; the script's read-out covers every step).
    for s in series {
        let pts: Vec<&(f64, f64)> = s.points.iter().filter(|p| p.1.is_finite()).collect();
        let every = pts.len().div_ceil(HOVER_POINTS).max(1);
        for p in pts.iter().step_by(every) {
            let _ = write!(
                svg,
                r#"<circle class="hit" cx="{:.1}" cy="{:.1}" r="5"><title>{}: step {}, {}</title></circle>"#,
                sx(p.0),
                sy(p.1),
                esc(s.name),
                p.0,
                value_text(p.1)
            );
        }
    }
    let _ = write!(
        svg,
        r#"<line class="cursor" x1="0" x2="0" y1="{PAD_T}" y2="{:.1}" visibility="hidden"/></svg><div class="readout" id="{id}-readout">&nbsp;</div></section>"#,
        PAD_T + ph
    );
    svg
}

/// Most points per series that get a hover title.
const HOVER_POINTS: usize = 400;

/// A value for a hover title: 5 significant digits.
fn value_text(v: f64) -> String {
    let a = v.abs();
    if v != 0.0 && !(1e-3..1e5).contains(&a) { format!("{v:.3e}") } else { format!("{}", (v * 1e5).round() / 1e5) }
}

/// Size of the three small panels (viewBox units; they scale to the page).
const SMALL: (f64, f64) = (380.0, 230.0);

fn fmt_num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The whole page.
pub fn render(history: &History, summary: &RunSummary, meta: &ChartMeta) -> String {
    let steps = &history.steps;
    let x_max = summary.total_steps.max(steps.last().map(|s| s.step).unwrap_or(0)) as f64;
    let loss: Vec<(f64, f64)> = steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let weight = if loss.len() < 20 { 0.6 } else { 0.9 };
    let smoothed: Vec<(f64, f64)> =
        loss.iter().map(|p| p.0).zip(smooth(&loss.iter().map(|p| p.1).collect::<Vec<_>>(), weight)).collect();
    let eval: Vec<(f64, f64)> = history.evals.iter().map(|e| (e.step as f64, e.eval_loss)).collect();
    let lr: Vec<(f64, f64)> = steps.iter().map(|s| (s.step as f64, s.learning_rate)).collect();
    let gn: Vec<(f64, f64)> = steps.iter().map(|s| (s.step as f64, s.grad_norm)).collect();
    let tps: Vec<(f64, f64)> = steps.iter().map(|s| (s.step as f64, s.tokens_per_second)).collect();
    let first_loss = history.losses.first().copied();

    let mut html = String::with_capacity(64 * 1024);
    let title = if meta.model.is_empty() { "LoRA training".to_string() } else { format!("LoRA training · {}", meta.model) };
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{}</title><style>{CSS}</style></head><body><main>"#,
        esc(&title)
    );
    let _ = write!(html, r#"<header class="top"><h1>{}</h1><p class="settings">"#, esc(&title));
    for (k, v) in &meta.settings {
        let _ = write!(html, r#"<span><b>{}</b> {}</span>"#, esc(k), esc(v));
    }
    html.push_str("</p></header>");

    // Start and end of the smoothed line, not two noisy single steps.
    let (smooth_start, smooth_end) = smoothed_ends(&loss.iter().map(|p| p.1).collect::<Vec<_>>());
    let change = |a: Option<f64>, b: Option<f64>, what: &str| match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && a != 0.0 => format!("{:+.1}% {what}", (b - a) / a * 100.0),
        _ => String::new(),
    };
    let first_eval = history.evals.first().filter(|e| history.evals.len() > 1 && e.step == 0).map(|e| e.eval_loss);
    let cards = [
        (
            "Loss, smoothed",
            format!("{} → {}", fmt_num(smooth_start, 3), fmt_num(smooth_end, 3)),
            change(smooth_start, smooth_end, "start to end"),
        ),
        ("Final loss", fmt_num(Some(summary.final_loss), 4), format!("first {}", fmt_num(first_loss, 4))),
        ("Min loss", fmt_num(Some(summary.min_loss), 4), format!("mean {}", fmt_num(Some(summary.train_loss), 4))),
        (
            "Eval loss",
            match first_eval {
                Some(b) => format!("{} → {}", fmt_num(Some(b), 3), fmt_num(summary.final_eval_loss, 3)),
                None => fmt_num(summary.final_eval_loss, 4),
            },
            match (first_eval, summary.final_perplexity, meta.merged_eval_loss) {
                (_, _, Some(m)) => format!("merged model {}", fmt_num(Some(m), 3)),
                (Some(_), _, None) => change(first_eval, summary.final_eval_loss, "before → after"),
                (None, Some(p), None) => format!("perplexity {p:.3}"),
                (None, None, None) => "no validation split".into(),
            },
        ),
        ("Steps", thousands(summary.total_steps), format!("{:.2} epochs", summary.epochs)),
        ("Duration", duration(summary.train_runtime), format!("{} tokens", thousands(summary.tokens))),
        (
            "Throughput",
            format!("{} tok/s", thousands(summary.tokens_per_second.round() as u64)),
            format!("{} trained tokens", thousands(summary.trained_tokens)),
        ),
    ];
    html.push_str(r#"<div class="cards">"#);
    for (name, value, sub) in cards {
        let _ = write!(
            html,
            r#"<div class="card stat"><div class="name">{}</div><div class="value">{}</div><div class="sub">{}</div></div>"#,
            esc(name),
            esc(&value),
            esc(&sub)
        );
    }
    html.push_str("</div>");

    let loss_series = [
        Series { name: "loss (each logged step)", color: "#7aa6e8", points: loss, faint: true, dots: false },
        Series { name: "smoothed", color: "#1f5fbf", points: smoothed, faint: false, dots: false },
        Series { name: "eval loss", color: "#e8590c", points: eval, faint: false, dots: true },
        Series {
            name: "merged model eval",
            color: "#495057",
            points: meta.merged_eval_loss.map(|m| vec![(x_max, m)]).unwrap_or_default(),
            faint: false,
            dots: true,
        },
    ];
    html.push_str(&panel("loss", "Training loss", "loss", &loss_series, (1080.0, 380.0), x_max, false));
    html.push_str(r#"<div class="grid3">"#);
    html.push_str(&panel(
        "lr",
        "Learning rate",
        "learning rate",
        &[Series { name: "lr", color: "#2b8a3e", points: lr, faint: false, dots: false }],
        SMALL,
        x_max,
        true,
    ));
    html.push_str(&panel(
        "gn",
        "Gradient norm",
        "grad norm",
        &[Series { name: "grad norm", color: "#9c36b5", points: gn, faint: false, dots: false }],
        SMALL,
        x_max,
        false,
    ));
    html.push_str(&panel(
        "tps",
        "Tokens / second",
        "tokens/s",
        &[Series { name: "tokens/s", color: "#c2255c", points: tps, faint: false, dots: false }],
        SMALL,
        x_max,
        true,
    ));
    html.push_str("</div>");

    // Data for the hover read-out (numbers only; the SVG above is complete without it).
    let data = serde_json::json!({
        "loss": history.steps.iter().map(|s| [s.step as f64, s.loss]).collect::<Vec<_>>(),
        "eval": history.evals.iter().map(|e| [e.step as f64, e.eval_loss]).collect::<Vec<_>>(),
        "lr": history.steps.iter().map(|s| [s.step as f64, s.learning_rate]).collect::<Vec<_>>(),
        "gn": history.steps.iter().map(|s| [s.step as f64, s.grad_norm]).collect::<Vec<_>>(),
        "tps": history.steps.iter().map(|s| [s.step as f64, s.tokens_per_second]).collect::<Vec<_>>(),
    });
    let data = data.to_string().replace("</", "<\\/").replace("NaN", "null");
    let _ = write!(
        html,
        r#"<footer>Written by lora {} · self-contained: no network, no external fonts or scripts</footer></main><script>const DATA={data};{JS}</script></body></html>"#,
        env!("CARGO_PKG_VERSION")
    );
    html
}

const CSS: &str = r#"
:root{--bg:#f4f6f9;--card:#fff;--ink:#1b1f24;--muted:#667085;--line:#e4e7ec}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1160px;margin:0 auto;padding:22px 22px 28px}
.top h1{font-size:21px;font-weight:650;margin:0 0 6px;letter-spacing:-.01em}
.settings{margin:0 0 16px;color:var(--muted);font-size:12.5px;display:flex;flex-wrap:wrap;gap:4px 14px}
.settings b{color:var(--ink);font-weight:600}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;box-shadow:0 1px 2px rgba(16,24,40,.05)}
.cards{display:grid;grid-template-columns:repeat(7,1fr);gap:10px;margin-bottom:14px}
.stat{padding:10px 12px}
.stat .name{color:var(--muted);font-size:11.5px;text-transform:uppercase;letter-spacing:.04em}
.stat .value{font-size:20px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums;white-space:nowrap}
.stat .sub{color:var(--muted);font-size:12px;min-height:1.2em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.panel{padding:12px 14px 6px;margin-bottom:14px;position:relative}
.panel header{display:flex;justify-content:space-between;align-items:baseline;gap:12px}
.panel h2{font-size:14px;font-weight:620;margin:0}
.legend{display:flex;gap:14px;color:var(--muted);font-size:12px}
.legend i{display:inline-block;width:14px;height:3px;border-radius:2px;margin-right:6px;vertical-align:middle}
svg{width:100%;height:auto;display:block}
.grid{stroke:var(--line);stroke-width:1}
.grid.v{stroke-dasharray:2 4}
.axis{stroke:#98a2b3;stroke-width:1}
.tick,.axis-label{fill:var(--muted);font-size:11.5px;font-variant-numeric:tabular-nums}
.hit{fill:transparent;stroke:none;pointer-events:all}
.hit:hover{fill:rgba(27,31,36,.18)}
.cursor{stroke:#98a2b3;stroke-width:1;stroke-dasharray:3 3}
.readout{color:var(--muted);font-size:12px;min-height:1.4em;font-variant-numeric:tabular-nums;padding:0 0 4px 50px}
.empty{color:var(--muted);padding:60px 0;text-align:center}
.grid3{display:grid;grid-template-columns:repeat(3,1fr);gap:14px}
.grid3 .panel{margin-bottom:0}
.grid3 .readout{padding-left:10px}
footer{color:var(--muted);font-size:11.5px;margin-top:16px;text-align:right}
@media (max-width:900px){.cards{grid-template-columns:repeat(3,1fr)}.grid3{grid-template-columns:repeat(2,1fr)}}
@media (max-width:560px){.grid3{grid-template-columns:1fr}}
@media (max-width:760px){#loss .tick,#loss .axis-label{font-size:19px}}
"#;

const JS: &str = r#"
(function(){
 function fmt(v){if(v===null||v===undefined)return"–";var a=Math.abs(v);if(a!==0&&(a<1e-3||a>=1e5))return v.toExponential(3);return(+v.toPrecision(5)).toString();}
 function near(arr,x){var best=null,d=Infinity;for(var i=0;i<arr.length;i++){var e=Math.abs(arr[i][0]-x);if(e<d){d=e;best=arr[i];}}return best;}
 var names={loss:[["loss","loss"],["eval","eval loss"]],lr:[["lr","learning rate"]],gn:[["gn","grad norm"]],tps:[["tps","tokens/s"]]};
 Object.keys(names).forEach(function(id){
  var svg=document.getElementById(id);if(!svg)return;
  var out=document.getElementById(id+"-readout"),cur=svg.querySelector(".cursor");
  var x0=+svg.dataset.x0,x1=+svg.dataset.x1,l=+svg.dataset.l,w=+svg.dataset.w;
  svg.addEventListener("mousemove",function(ev){
   var r=svg.getBoundingClientRect(),vx=(ev.clientX-r.left)/r.width*svg.viewBox.baseVal.width;
   var x=x0+(vx-l)/w*(x1-x0),p=near(DATA[names[id][0][0]],x);if(!p)return;
   var px=l+(p[0]-x0)/(x1-x0)*w;cur.setAttribute("x1",px);cur.setAttribute("x2",px);cur.setAttribute("visibility","visible");
   var parts=["step "+p[0]];names[id].forEach(function(n){var q=near(DATA[n[0]],p[0]);if(q&&q[0]===p[0])parts.push(n[1]+" "+fmt(q[1]));});
   out.textContent=parts.join("  ·  ");
  });
  svg.addEventListener("mouseleave",function(){cur.setAttribute("visibility","hidden");out.innerHTML="&nbsp;";});
 });
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use lora_api::{EvalMetrics, StepMetrics};

    /// A plausible run: noisy decaying loss, warmup then linear decay, evals every 25 steps.
    pub(crate) fn sample_history(n: u64) -> History {
        let mut h = History::default();
        let mut seed = 12345u64;
        for step in 1..=n {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.25;
            let loss = 0.9 + 1.6 * (-(step as f64) / 40.0).exp() + noise;
            let lr = if step <= 10 { 2e-4 * step as f64 / 10.0 } else { 2e-4 * (n - step) as f64 / (n - 10) as f64 };
            h.losses.push(loss);
            h.tokens += 4096;
            h.trained_tokens += 2500;
            h.steps.push(StepMetrics {
                step,
                epoch: step as f64 / (n as f64 / 3.0),
                max_steps: n,
                loss,
                grad_norm: 0.2 + 0.6 * (-(step as f64) / 30.0).exp() + noise.abs() * 0.3,
                learning_rate: lr,
                tokens: 4096,
                trained_tokens: 2500,
                tokens_per_second: 5200.0 + noise * 800.0,
                elapsed_s: step as f64 * 0.8,
            });
            if step % 25 == 0 {
                let eval_loss = 1.0 + 1.5 * (-(step as f64) / 45.0).exp();
                h.evals.push(EvalMetrics { step, epoch: 0.0, eval_loss, perplexity: eval_loss.exp(), eval_tokens: 9000 });
            }
        }
        h
    }

    #[test]
    fn the_page_is_self_contained_and_shows_every_panel() {
        let h = sample_history(150);
        let page = render(&h, &h.summary(3.0, 120.0, 0), &ChartMeta { model: "Qwen/Qwen2.5-1.5B-Instruct".into(), settings: vec![], ..Default::default() });
        for needle in ["Training loss", "Learning rate", "Gradient norm", "Tokens / second", "Final loss", "Min loss", "Eval loss", "<svg", "<polyline"] {
            assert!(page.contains(needle), "missing {needle}");
        }
        for banned in ["http://", "https://", "@import", "<link", "src=", "url("] {
            assert!(!page.contains(banned), "external reference {banned:?} in the chart");
        }
    }

    #[test]
    fn no_data_is_an_honest_empty_page_not_a_crash() {
        let h = History::default();
        let page = render(&h, &h.summary(0.0, 0.0, 0), &ChartMeta::default());
        assert!(page.contains("No data logged"));
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let t = ticks(0.93, 2.71, 5);
        assert!(t.first().unwrap() >= &0.93 && t.last().unwrap() <= &2.71 && t.len() >= 3, "{t:?}");
        assert_eq!(label(2e-4), "2e-4");
        assert_eq!(label(1.5), "1.5");
    }

    /// The y tick labels of panel `id`.
    fn y_ticks(page: &str, id: &str) -> Vec<f64> {
        let start = page.find(&format!(r#"<svg id="{id}""#)).unwrap();
        let svg = &page[start..start + page[start..].find("</svg>").unwrap()];
        svg.split(r#"text-anchor="end">"#).skip(1).filter_map(|t| t.split('<').next()?.parse().ok()).collect()
    }

    /// Issue 15: a loss moving 0.7% over three steps is drawn on an axis spanning at least a
    /// quarter of its size, not zoomed until the noise looks like a cliff; every panel titles
    /// both axes; points carry their values as SVG titles (hover without scripts).
    #[test]
    fn small_changes_are_not_cliffs_and_points_say_their_values() {
        let mut h = History::default();
        for (i, loss) in [3.095, 3.09, 3.073].into_iter().enumerate() {
            let step = i as u64 + 1;
            h.losses.push(loss);
            h.steps.push(StepMetrics { step, epoch: step as f64 / 3.0, max_steps: 3, loss, grad_norm: 0.5, learning_rate: 2e-5 * i as f64, tokens: 10, trained_tokens: 5, tokens_per_second: 100.0, elapsed_s: step as f64 });
        }
        let page = render(&h, &h.summary(1.0, 3.0, 0), &ChartMeta::default());
        let t = y_ticks(&page, "loss");
        let span = t.last().unwrap() - t.first().unwrap();
        assert!(span >= 0.5, "loss axis ticks {t:?}");
        assert!(page.contains("<title>loss (each logged step): step 2, 3.09</title>"), "hover titles");
        for axis in ["optimizer step", ">loss</text>", ">learning rate</text>", ">grad norm</text>", ">tokens/s</text>"] {
            assert!(page.contains(axis), "axis title {axis}");
        }
        assert!(!page.contains("NaN"));
    }

    #[test]
    fn the_summary_compares_smoothed_ends_and_eval_before_and_after() {
        let mut h = sample_history(150);
        h.evals.insert(0, EvalMetrics { step: 0, epoch: 0.0, eval_loss: 2.5, perplexity: 2.5f64.exp(), eval_tokens: 9000 });
        let page = render(&h, &h.summary(3.0, 120.0, 0), &ChartMeta::default());
        let (a, b) = smoothed_ends(&h.steps.iter().map(|s| s.loss).collect::<Vec<_>>());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(b < a * 0.6, "{a} → {b}");
        assert!(page.contains(&format!("{a:.3} → {b:.3}")), "smoothed start → end");
        let last = h.evals.last().unwrap().eval_loss;
        assert!(page.contains(&format!("2.500 → {last:.3}")), "eval before → after");
    }

    #[test]
    fn smoothing_is_debiased() {
        let s = smooth(&[2.0, 2.0, 2.0], 0.9);
        assert!(s.iter().all(|v| (v - 2.0).abs() < 1e-12), "{s:?}");
    }
}

/// Writes a sample chart (for the screenshot check in `tests/ci.d/40-chart.sh`):
/// `LORA_CHART_SAMPLE=out.html cargo test -p lora --lib chart::sample`.
#[cfg(test)]
mod sample {
    #[test]
    fn write_sample_chart_when_asked() {
        let Ok(path) = std::env::var("LORA_CHART_SAMPLE") else { return };
        let mut h = super::tests::sample_history(150);
        h.evals.insert(0, lora_api::EvalMetrics { step: 0, epoch: 0.0, eval_loss: 2.5, perplexity: 2.5f64.exp(), eval_tokens: 9000 });
        let meta = super::ChartMeta {
            model: "Qwen/Qwen2.5-1.5B-Instruct".into(),
            settings: vec![
                ("lr".into(), "0.0002 linear, warmup 10".into()),
                ("DoRA".into(), "r 16, alpha 32, dropout 0".into()),
                ("targets".into(), "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj".into()),
                ("data".into(), "chat_template".into()),
                ("batch".into(), "128".into()),
                ("epochs".into(), "3".into()),
                ("seed".into(), "3407".into()),
            ],
            merged_eval_loss: Some(1.02),
        };
        std::fs::write(path, super::render(&h, &h.summary(3.0, 120.0, 0), &meta)).unwrap();
    }
}
