//! PNG charts for the compare report. plotters' bitmap backend draws the data, grid and axes; all text is laid
//! out and rasterized here with ab_glyph from DejaVu Sans built into the binary (the `dejavu` crate), so no
//! system font or fontconfig is needed, and glyphs keep their side bearings and a common baseline (plotters' own
//! ab_glyph text loses both). Ticks are chosen here (round values); legends sit in a strip right of the plot,
//! where they never hide data.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 620;
/// Font sizes in pixels per em.
const TITLE: f32 = 24.0;
const AXIS: f32 = 18.0;
const TICK: f32 = 15.0;
const LEGEND: f32 = 16.0;
const MIN_LEGEND: u32 = 170;
const MAX_LEGEND: u32 = 400;
/// Lines with more points than this have no markers.
const MAX_MARKERS: usize = 30;

/// Tableau 10: distinct on white and for the common kinds of colour blindness.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const BEFORE: RGBColor = RGBColor(170, 170, 170);
const AFTER: RGBColor = RGBColor(31, 119, 180);
const TEXT: RGBColor = RGBColor(30, 30, 30);

pub fn color(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

// ---------------------------------------------------------------------------------------------------------------
// Text

fn font(bold: bool) -> &'static FontRef<'static> {
    static REGULAR: OnceLock<FontRef<'static>> = OnceLock::new();
    static BOLD: OnceLock<FontRef<'static>> = OnceLock::new();
    let (cell, bytes) = if bold { (&BOLD, dejavu::sans::bold()) } else { (&REGULAR, dejavu::sans::regular()) };
    cell.get_or_init(|| {
        FontRef::try_from_slice(bytes).expect("DejaVu Sans from the dejavu crate is a valid TrueType font")
    })
}

/// ab_glyph scales by ascent−descent; `size` here is pixels per em, as in CSS.
fn px_scale(font: &FontRef, size: f32) -> PxScale {
    PxScale::from(size * font.height_unscaled() / font.units_per_em().unwrap_or(2048.0))
}

/// DejaVu Sans' capital height, in ems (1493 / 2048).
const CAP_HEIGHT: f32 = 0.729;

#[derive(Clone, Copy, PartialEq)]
enum Align {
    /// Horizontally: the text starts at the anchor. Vertically: the tops of capitals are at the anchor.
    Start,
    /// The middle of the advance width, or of the capitals.
    Center,
    /// Horizontally: the text ends at the anchor. Vertically: the baseline is at the anchor.
    End,
}

/// The advance width of `text` in pixels.
fn text_width(text: &str, size: f32, bold: bool) -> f32 {
    let font = font(bold);
    let scaled = font.as_scaled(px_scale(font, size));
    let mut width = 0.0;
    let mut previous = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = previous {
            width += scaled.kern(p, id);
        }
        width += scaled.h_advance(id);
        previous = Some(id);
    }
    width
}

/// `text` cut with "…" to at most `max_width` pixels.
fn fit(text: &str, size: f32, max_width: f32) -> String {
    if text_width(text, size, false) <= max_width {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate = format!("{}…", chars.iter().collect::<String>());
        if text_width(&candidate, size, false) <= max_width {
            return candidate;
        }
    }
    "…".into()
}

struct TextStyle {
    size: f32,
    bold: bool,
    color: RGBColor,
    h: Align,
    v: Align,
    /// A quarter turn counter-clockwise: the text reads upwards (a y-axis title).
    vertical: bool,
}

impl TextStyle {
    fn new(size: f32, h: Align, v: Align) -> Self {
        Self { size, bold: false, color: TEXT, h, v, vertical: false }
    }
}

/// Draws `text` anchored at `at` (pixel coordinates of `area`), antialiased, kerned, with the glyphs' bearings.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    at: (i32, i32),
    style: &TextStyle,
) -> Result<()> {
    let font = font(style.bold);
    let scale = px_scale(font, style.size);
    let scaled = font.as_scaled(scale);
    let width = text_width(text, style.size, style.bold);
    let dx = match style.h {
        Align::Start => 0.0,
        Align::Center => -width / 2.0,
        Align::End => -width,
    };
    let cap = CAP_HEIGHT * style.size;
    let baseline = match style.v {
        Align::Start => cap,
        Align::Center => cap / 2.0,
        Align::End => 0.0,
    };
    let mut pen = dx;
    let mut previous = None;
    let mut failed = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = previous {
            pen += scaled.kern(p, id);
        }
        previous = Some(id);
        let glyph = id.with_scale_and_position(scale, point(pen, baseline));
        pen += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else { continue };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            if coverage < 0.02 || failed.is_some() {
                return;
            }
            // (lx, ly): the pixel relative to the anchor, x along the text, y down.
            let (lx, ly) = (bounds.min.x as i32 + gx as i32, bounds.min.y as i32 + gy as i32);
            let (x, y) = if style.vertical { (at.0 + ly, at.1 - lx) } else { (at.0 + lx, at.1 + ly) };
            if let Err(e) = area.draw_pixel((x, y), &style.color.mix(coverage.min(1.0) as f64)) {
                failed = Some(e.to_string());
            }
        });
    }
    match failed {
        Some(e) => Err(anyhow!("drawing text: {e}")),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Ticks and frames

/// Round tick values covering [lo, hi], about `target` of them, and the decimals their step needs.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let raw = ((hi - lo) / target.max(1) as f64).max(1e-12);
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = magnitude
        * match raw / magnitude {
            n if n <= 1.0 => 1.0,
            n if n <= 2.0 => 2.0,
            n if n <= 2.5 => 2.5,
            n if n <= 5.0 => 5.0,
            _ => 10.0,
        };
    let decimals =
        (-(step.log10().floor()) as i64).max(0) as usize + usize::from((step / magnitude - 2.5).abs() < 1e-9);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), decimals)
}

fn integer_ticks(lo: i64, hi: i64, target: usize) -> Vec<i64> {
    let (ticks, _) = nice_ticks(lo as f64, hi as f64, target);
    let step = ticks.windows(2).next().map_or(1.0, |w| w[1] - w[0]).max(1.0).round() as i64;
    (lo..=hi).filter(|s| s.rem_euclid(step) == 0).collect()
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("cannot draw {}: {e}", path.display())
}

/// The image, split into the plot (with room above for the title) and the legend strip on the right.
struct Canvas<'a> {
    root: DrawingArea<BitMapBackend<'a>, Shift>,
    plot: DrawingArea<BitMapBackend<'a>, Shift>,
    legend: DrawingArea<BitMapBackend<'a>, Shift>,
}

fn canvas<'a>(path: &'a Path, title: &str, legend_labels: &[&str]) -> Result<Canvas<'a>> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let widest = legend_labels.iter().map(|l| text_width(l, LEGEND, false)).fold(0.0, f32::max);
    let legend_width = ((widest as u32) + 70).clamp(MIN_LEGEND, MAX_LEGEND);
    let (plot, legend) = root.split_horizontally(WIDTH - legend_width);
    let title_style = TextStyle { bold: true, ..TextStyle::new(TITLE, Align::Center, Align::Center) };
    draw_text(&root, title, ((WIDTH - legend_width) as i32 / 2 + 40, 28), &title_style)?;
    Ok(Canvas { root, plot, legend })
}

/// Grid lines at the ticks (vertical ones only with `x_grid`), the left and bottom axes, and tick marks.
fn frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (std::ops::Range<i32>, std::ops::Range<i32>),
    x_ticks: &[i32],
    y_ticks: &[i32],
    x_grid: bool,
) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the axes: {e}");
    let grid = RGBColor(225, 225, 225).stroke_width(1);
    let axis = RGBColor(90, 90, 90).stroke_width(1);
    let (bottom, left) = (y.end - 1, x.start);
    for &py in y_ticks {
        root.draw(&PathElement::new(vec![(left, py), (x.end - 1, py)], grid)).map_err(e)?;
        root.draw(&PathElement::new(vec![(left - 5, py), (left, py)], axis)).map_err(e)?;
    }
    for &px in x_ticks {
        if x_grid {
            root.draw(&PathElement::new(vec![(px, y.start), (px, bottom)], grid)).map_err(e)?;
        }
        root.draw(&PathElement::new(vec![(px, bottom), (px, bottom + 5)], axis)).map_err(e)?;
    }
    root.draw(&PathElement::new(vec![(left, y.start), (left, bottom), (x.end - 1, bottom)], axis)).map_err(e)?;
    Ok(())
}

/// The axis titles and tick labels, drawn around the plotting area `x` × `y` (pixel ranges).
fn axis_text<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (std::ops::Range<i32>, std::ops::Range<i32>),
    x_label: &str,
    y_label: &str,
    x_ticks: &[(i32, String)],
    y_ticks: &[(i32, String)],
) -> Result<()> {
    for (px, text) in x_ticks {
        draw_text(root, text, (*px, y.end + 12), &TextStyle::new(TICK, Align::Center, Align::Start))?;
    }
    let mut widest = 0.0f32;
    for (py, text) in y_ticks {
        draw_text(root, text, (x.start - 10, *py), &TextStyle::new(TICK, Align::End, Align::Center))?;
        widest = widest.max(text_width(text, TICK, false));
    }
    draw_text(root, x_label, ((x.start + x.end) / 2, y.end + 44), &TextStyle::new(AXIS, Align::Center, Align::Start))?;
    let y_title = TextStyle { vertical: true, ..TextStyle::new(AXIS, Align::Center, Align::End) };
    // The y title's baseline sits left of the widest tick label.
    let left = x.start - 18 - widest as i32;
    draw_text(root, y_label, (left, (y.start + y.end) / 2), &y_title)?;
    Ok(())
}

/// One legend entry: a line (with a marker where the lines have them), or a filled box.
struct LegendEntry<'a> {
    label: &'a str,
    color: RGBColor,
    filled_box: bool,
    marker: bool,
}

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, entries: &[LegendEntry]) -> Result<()> {
    let (width, _) = area.dim_in_pixel();
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the legend: {e}");
    for (i, entry) in entries.iter().enumerate() {
        let y = 76 + i as i32 * 30;
        if entry.filled_box {
            area.draw(&Rectangle::new([(10, y - 9), (34, y + 9)], entry.color.filled())).map_err(e)?;
        } else {
            area.draw(&PathElement::new(vec![(6, y), (38, y)], entry.color.stroke_width(3))).map_err(e)?;
            if entry.marker {
                area.draw(&Circle::new((22, y), 4, entry.color.filled())).map_err(e)?;
            }
        }
        let label = fit(entry.label, LEGEND, width as f32 - 56.0);
        draw_text(area, &label, (46, y), &TextStyle::new(LEGEND, Align::Start, Align::Center))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Charts

/// One line of a line chart.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// A padded range around `values` (a small range around a single value).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 { span * 0.08 } else { (lo.abs() * 0.05).max(0.01) };
    (lo - pad, hi + pad)
}

/// A line chart of `series` against the optimizer step (integer ticks), with the legend on the right.
/// `y_range`: fixed limits (e.g. for percentages), otherwise fitted to the data.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
    let Canvas { root, plot, legend } = canvas(path, title, &labels)?;

    let steps = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (x_min, x_max) = if x_min.is_finite() { (x_min as i64, x_max as i64) } else { (0, 1) };
    // At least one step on either side of a single point.
    let (x_min, x_max) = if x_max > x_min { (x_min, x_max) } else { ((x_min - 1).max(0), x_min + 1) };
    let (y_min, y_max) = y_range.unwrap_or_else(|| padded(series.iter().flat_map(|s| s.points.iter().map(|p| p.1))));
    let x_ticks = integer_ticks(x_min, x_max, 10);
    let x_pad = (x_max - x_min) as f64 * 0.02;
    let (y_ticks, decimals) = nice_ticks(y_min, y_max, 8);

    let mut chart = chart_builder(&plot)
        // A little room left and right so that the first and last markers clear the frame.
        .build_cartesian_2d((x_min as f64 - x_pad)..(x_max as f64 + x_pad), y_min..y_max)
        .map_err(err(path))?;
    let area = chart.plotting_area().get_pixel_range();
    let x_px: Vec<i32> = x_ticks.iter().map(|&x| chart.backend_coord(&(x as f64, y_min)).0).collect();
    let y_px: Vec<i32> = y_ticks.iter().map(|&y| chart.backend_coord(&(x_min as f64, y)).1).collect();
    frame(&root, area.clone(), &x_px, &y_px, true)?;
    for s in series {
        let points: Vec<(f64, f64)> = s.points.iter().filter(|p| p.1.is_finite()).copied().collect();
        chart.draw_series(LineSeries::new(points.clone(), s.color.stroke_width(2))).map_err(err(path))?;
        // Markers show where the logged values are while there are few; past that they only clutter.
        if points.len() <= MAX_MARKERS {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, s.color.filled()))).map_err(err(path))?;
        }
    }
    let x_text: Vec<(i32, String)> = x_px.iter().zip(&x_ticks).map(|(&px, x)| (px, x.to_string())).collect();
    let y_text: Vec<(i32, String)> =
        y_px.iter().zip(&y_ticks).map(|(&py, y)| (py, format!("{:.*}", decimals, y + 0.0))).collect();
    axis_text(&root, area.clone(), x_label, y_label, &x_text, &y_text)?;
    if series.iter().all(|s| s.points.is_empty()) {
        let centre = ((area.0.start + area.0.end) / 2, (area.1.start + area.1.end) / 2);
        draw_text(
            &root,
            "no data",
            centre,
            &TextStyle { color: RGBColor(120, 120, 120), ..TextStyle::new(22.0, Align::Center, Align::Center) },
        )?;
    }
    let entries: Vec<LegendEntry> = series
        .iter()
        .map(|s| LegendEntry {
            label: &s.label,
            color: s.color,
            filled_box: false,
            marker: s.points.len() <= MAX_MARKERS,
        })
        .collect();
    draw_legend(&legend, &entries)?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// The chart builder of every plot: the same margins, and label areas for `axis_text`.
fn chart_builder<'a, 'b, DB: DrawingBackend>(plot: &'a DrawingArea<DB, Shift>) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(plot);
    builder
        .margin_top(56)
        .margin_right(24)
        .margin_left(12)
        .margin_bottom(8)
        .x_label_area_size(76)
        .y_label_area_size(96);
    builder
}

/// One group of the before/after bar chart: values in percent; None is shown as "n/a".
pub struct BeforeAfter {
    pub label: String,
    pub before: Option<f64>,
    pub after: Option<f64>,
}

/// Grouped bars per run, before (grey) and after (blue), on 0–100 %, each value printed above its bar.
pub fn before_after_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    groups: &[BeforeAfter],
) -> Result<()> {
    let Canvas { root, plot, legend } = canvas(path, title, &["before training", "after training"])?;
    let n = groups.len().max(1) as f64;
    let y_ticks: Vec<f64> = (0..=10).map(|k| k as f64 * 10.0).collect();
    let mut chart = chart_builder(&plot).build_cartesian_2d(0.0..n, 0.0..108.0).map_err(err(path))?;
    let y_px: Vec<i32> = y_ticks.iter().map(|&y| chart.backend_coord(&(0.0, y)).1).collect();
    frame(&root, chart.plotting_area().get_pixel_range(), &[], &y_px, false)?;
    let slot = (chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0) as f32;
    let mut x_text = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let i = i as f64;
        for (value, color, from, to) in [(group.before, BEFORE, 0.14, 0.49), (group.after, AFTER, 0.51, 0.86)] {
            let centre = chart.backend_coord(&(i + (from + to) / 2.0, 0.0)).0;
            let (text, top) = match value {
                Some(v) => {
                    let v = v.clamp(0.0, 100.0);
                    chart
                        .draw_series(std::iter::once(Rectangle::new([(i + from, 0.0), (i + to, v)], color.filled())))
                        .map_err(err(path))?;
                    (format!("{v:.1}"), chart.backend_coord(&(i, v)).1)
                }
                None => ("n/a".to_string(), chart.backend_coord(&(i, 0.0)).1),
            };
            draw_text(&root, &text, (centre, top - 6), &TextStyle::new(TICK, Align::Center, Align::End))?;
        }
        x_text.push((chart.backend_coord(&(i + 0.5, 0.0)).0, fit(&group.label, TICK, slot - 8.0)));
    }
    let y_text: Vec<(i32, String)> = y_px.iter().zip(&y_ticks).map(|(&py, y)| (py, format!("{y:.0}"))).collect();
    axis_text(&root, chart.plotting_area().get_pixel_range(), x_label, y_label, &x_text, &y_text)?;
    let entries = [
        LegendEntry { label: "before training", color: BEFORE, filled_box: true, marker: false },
        LegendEntry { label: "after training", color: AFTER, filled_box: true, marker: false },
    ];
    draw_legend(&legend, &entries)?;
    root.present().map_err(err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        let show = |(ticks, decimals): (Vec<f64>, usize)| {
            ticks.iter().map(|t| format!("{t:.decimals$}")).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(show(nice_ticks(0.0, 1.0, 5)), "0.0 0.2 0.4 0.6 0.8 1.0");
        assert_eq!(show(nice_ticks(-2.0, 102.0, 8)), "0 20 40 60 80 100");
        assert_eq!(show(nice_ticks(0.68, 0.72, 8)), "0.680 0.685 0.690 0.695 0.700 0.705 0.710 0.715 0.720");
        assert_eq!(show(nice_ticks(0.0, 12.0, 8)), "0 2 4 6 8 10 12");
        assert_eq!(show(nice_ticks(0.0, 10.0, 4)), "0.0 2.5 5.0 7.5 10.0");
        assert_eq!(integer_ticks(1, 2, 10), vec![1, 2]);
        assert_eq!(integer_ticks(0, 100, 10), (0..=10).map(|k| k * 10).collect::<Vec<_>>());
    }
}
