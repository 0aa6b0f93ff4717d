//! Plots with plotters, as SVG or PNG by file extension: the run figure (latency CDFs, throughput and
//! in-flight requests over time), the sweep curve, and the A/B comparison CDFs.
//!
//! Text needs a TrueType font: `CADUCEUS_PLOT_FONT`, else a common system font (DejaVu, Liberation,
//! Noto, FreeSans).

use crate::outcome::RequestOutcome;
use crate::report::Report;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot file {0} must end in .svg or .png")]
    Format(PathBuf),
    #[error("no TrueType font found for plot text; set CADUCEUS_PLOT_FONT=/path/to/font.ttf")]
    NoFont,
    #[error("drawing the plot failed: {0}")]
    Draw(String),
    #[error("writing {path}: {why}")]
    Write { path: PathBuf, why: String },
}

const FONT: &str = "sans-serif";
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font with plotters once per process.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let env = std::env::var("CADUCEUS_PLOT_FONT").ok();
        let candidates = env
            .iter()
            .map(String::as_str)
            .chain(FONT_PATHS.iter().copied());
        for path in candidates {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            // plotters keeps a 'static reference; one font per process is a bounded, deliberate leak.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    });
    ok.then_some(()).ok_or(PlotError::NoFont)
}

/// Whether plots can be drawn here (tests skip drawing with a notice when not).
pub fn font_available() -> bool {
    ensure_font().is_ok()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a panel.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel: title, axis names, lines.
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

/// Empirical CDF points of `xs` (at most ~1000, enough for a smooth curve and a small SVG).
pub fn cdf(xs: &[f64]) -> Vec<(f64, f64)> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = n.div_ceil(1000).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    if let (Some(&last), Some(&(x, _))) = (v.last(), pts.last()) {
        if x != last || pts.len() == 1 {
            pts.push((last, 1.0));
        }
    }
    pts
}

/// Draws panels on a grid of `rows` x `cols` into an SVG or PNG file.
pub fn draw_grid(
    path: &Path,
    title: &str,
    rows: usize,
    cols: usize,
    panels: &[Panel],
) -> Result<(), PlotError> {
    ensure_font()?;
    let size = ((cols as u32) * 520, (rows as u32) * 400 + 40);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_on(&root, title, rows, cols, panels)?;
            root.present().map_err(|e| PlotError::Write {
                path: path.to_path_buf(),
                why: e.to_string(),
            })
        }
        Some("png") => {
            let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                draw_on(&root, title, rows, cols, panels)?;
                root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
            }
            write_png(path, size, &buf)
        }
        _ => Err(PlotError::Format(path.to_path_buf())),
    }
}

fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<(), PlotError> {
    let err = |why: String| PlotError::Write {
        path: path.to_path_buf(),
        why,
    };
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
    writer
        .write_image_data(rgb)
        .map_err(|e| err(e.to_string()))?;
    writer.finish().map_err(|e| err(e.to_string()))
}

fn draw_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    rows: usize,
    cols: usize,
    panels: &[Panel],
) -> Result<(), PlotError> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| PlotError::Draw(x.to_string());
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, (FONT, 22)).map_err(e)?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
        draw_panel(area, panel).map_err(e)?;
    }
    Ok(())
}

fn bounds(series: &[Series]) -> (f64, f64, f64) {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return (0.0, 1.0, 1.0);
    }
    // Start at 0 for context, unless the data sits far from it (then 0 would squash it to a line).
    let x0 = if x0 >= 0.0 && x0 <= 0.4 * x1 {
        0.0
    } else {
        x0 - 0.05 * (x1 - x0)
    };
    let x1 = if x1 > x0 {
        x1 + 0.02 * (x1 - x0)
    } else {
        x0 + 1.0
    };
    (x0, x1, if y1 > 0.0 { y1 * 1.08 } else { 1.0 })
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x0, x1, y1) = bounds(&p.series);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)?;
    chart
        .configure_mesh()
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_labels(8)
        .y_labels(8)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    if p.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    Ok(())
}

/// Latency-CDF panel for one metric from several labelled samples (milliseconds).
pub fn cdf_panel(title: &str, samples: &[(&str, Vec<f64>)]) -> Panel {
    Panel {
        title: title.into(),
        x_desc: "ms".into(),
        y_desc: "fraction of requests".into(),
        series: samples
            .iter()
            .map(|(label, xs)| Series {
                label: label.to_string(),
                points: cdf(xs),
            })
            .collect(),
    }
}

/// The run figure: TTFT, TPOT/ITL and E2EL CDFs; output tokens/s, requests/s and in-flight over time.
pub fn plot_run(
    report: &Report,
    outcomes: &[RequestOutcome],
    path: &Path,
) -> Result<(), PlotError> {
    let ok = || outcomes.iter().filter(|o| o.ok());
    let ttft: Vec<f64> = ok().filter_map(|o| o.ttft_s).map(|s| s * 1e3).collect();
    let tpot: Vec<f64> = ok().filter_map(|o| o.tpot_s()).map(|s| s * 1e3).collect();
    let itl: Vec<f64> = ok().flat_map(|o| o.itl_s.iter().map(|s| s * 1e3)).collect();
    let e2el: Vec<f64> = ok().map(|o| o.e2el_s * 1e3).collect();
    let ts = &report.time_series;
    // Rates per bucket, plotted at the bucket's middle (the last bucket may be partial).
    let rate = |f: &dyn Fn(&crate::timeseries::Second) -> f64| -> Vec<(f64, f64)> {
        ts.iter()
            .filter(|s| s.width_s > 0.0)
            .map(|s| (s.t + s.width_s / 2.0, f(s) / s.width_s))
            .collect()
    };
    let over_time = |title: &str, y: &str, series: Vec<(&str, Vec<(f64, f64)>)>| Panel {
        title: title.into(),
        x_desc: "seconds".into(),
        y_desc: y.into(),
        series: series
            .into_iter()
            .map(|(l, points)| Series {
                label: l.into(),
                points,
            })
            .collect(),
    };
    let panels = vec![
        cdf_panel("TTFT", &[("TTFT", ttft)]),
        cdf_panel("TPOT and ITL", &[("TPOT", tpot), ("ITL", itl)]),
        cdf_panel("End-to-end latency", &[("E2EL", e2el)]),
        over_time(
            "Output throughput",
            "tokens/s",
            vec![("output tok/s", rate(&|s| s.output_tokens))],
        ),
        over_time(
            "Requests",
            "requests/s",
            vec![
                ("sent", rate(&|s| s.sent as f64)),
                ("completed", rate(&|s| s.completed as f64)),
                ("failed", rate(&|s| s.failed as f64)),
            ],
        ),
        over_time(
            "Requests in flight",
            "requests",
            vec![(
                "in flight (mean)",
                ts.iter()
                    .map(|s| (s.t + s.width_s / 2.0, s.in_flight))
                    .collect(),
            )],
        ),
    ];
    let title = format!(
        "{} - {} requests, rate {}, schedule {}",
        report.plan.model_id,
        report.plan.num_prompts,
        report.plan.request_rate.as_deref().unwrap_or("closed loop"),
        report.plan.schedule_hash
    );
    draw_grid(path, &title, 2, 3, &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_ends_at_one_and_is_monotone() {
        let pts = cdf(&[3.0, 1.0, 2.0, 2.0]);
        assert_eq!(pts.first(), Some(&(1.0, 0.25)));
        assert_eq!(pts.last(), Some(&(3.0, 1.0)));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let big: Vec<f64> = (0..10_000).map(f64::from).collect();
        let pts = cdf(&big);
        assert!(pts.len() <= 1001 && pts.last() == Some(&(9999.0, 1.0)));
        assert!(cdf(&[]).is_empty());
    }
}
