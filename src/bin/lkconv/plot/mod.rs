//! `lkconv bench --plot FILE.png|FILE.svg`: the run's results as a chart.
//!
//! Two layers: [`Figure`] arranges measurements (panels, x positions, one series per
//! implementation; unit-tested without drawing), [`render`] draws it with plotters into a PNG
//! (bitmap backend, text from the embedded DejaVu Sans through ab_glyph: no system fonts) or an
//! SVG, and the bytes are written atomically.

mod typeset;

use std::path::Path;

use lkconv::{Error, Result};
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The font every chart's text is drawn in (assets/fonts/LICENSE-DejaVu.txt: Bitstream Vera
/// licence, DejaVu changes public domain).
static FONT: &[u8] = include_bytes!("../../../../assets/fonts/DejaVuSans.ttf");
/// The family name the font is registered under (plotters' default for labels).
const FAMILY: &str = "sans-serif";

/// Chart width and the height of the title and of each panel, in pixels.
const WIDTH: u32 = 960;
const HEADER: u32 = 56;
const PANEL: u32 = 340;
/// Bars per chart up to which each bar carries its value.
const MAX_LABELLED_BARS: usize = 40;
/// A y range spanning more than this factor is drawn on a logarithmic axis.
const LOG_RATIO: f64 = 20.0;

/// What the x axis of a figure holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Named categories (a layer, a model part), one group of bars each.
    Bars,
    /// Kernel sizes: one line per series.
    KernelSweep,
}

/// Where one measurement goes: its panel, its series, its x position and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub panel: String,
    pub series: String,
    /// The category name (`Kind::Bars`) or the kernel size (`Kind::KernelSweep`).
    pub x: XKey,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum XKey {
    Category(String),
    Kernel(usize),
}

impl XKey {
    fn label(&self) -> String {
        match self {
            XKey::Category(s) => s.clone(),
            XKey::Kernel(k) => k.to_string(),
        }
    }
}

/// One panel: its x positions (in order) and one row of values per series of the figure
/// (None where that series has no measurement there).
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub xs: Vec<XKey>,
    /// Indexed like `Figure::series`, each row indexed like `xs`.
    pub values: Vec<Vec<Option<f64>>>,
}

/// A chart: a title, a subtitle (device, machine, how it was measured), and panels stacked
/// vertically sharing the series (same colour per series in every panel).
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub kind: Kind,
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<String>,
    pub panels: Vec<Panel>,
    /// Whether a wide range may be drawn on a log axis (false: shares matter, always linear).
    pub log_allowed: bool,
}

impl Figure {
    /// Arranges `points`: panels, series and x positions in the order they first appear
    /// (kernel sizes sorted ascending); a repeated (panel, series, x) keeps the last value.
    pub fn new(
        kind: Kind,
        title: &str,
        subtitle: &str,
        x_label: &str,
        y_label: &str,
        points: &[Point],
    ) -> Result<Self> {
        if points.is_empty() {
            return Err(Error::InvalidArgument(
                "--plot: nothing was measured".into(),
            ));
        }
        if let Some(p) = points
            .iter()
            .find(|p| !(p.value.is_finite() && p.value > 0.0))
        {
            return Err(Error::InvalidArgument(format!(
                "--plot: {} {} {}: the time {} cannot be drawn",
                p.panel,
                p.series,
                p.x.label(),
                p.value
            )));
        }
        let mut series: Vec<String> = Vec::new();
        let mut panels: Vec<Panel> = Vec::new();
        for p in points {
            if !series.contains(&p.series) {
                series.push(p.series.clone());
            }
            let panel = match panels.iter().position(|q| q.title == p.panel) {
                Some(i) => &mut panels[i],
                None => {
                    panels.push(Panel {
                        title: p.panel.clone(),
                        xs: Vec::new(),
                        values: Vec::new(),
                    });
                    panels.last_mut().expect("just pushed")
                }
            };
            if !panel.xs.contains(&p.x) {
                panel.xs.push(p.x.clone());
            }
        }
        for panel in &mut panels {
            if kind == Kind::KernelSweep {
                panel.xs.sort_by_key(|x| match x {
                    XKey::Kernel(k) => *k,
                    XKey::Category(_) => usize::MAX,
                });
            }
            panel.values = vec![vec![None; panel.xs.len()]; series.len()];
        }
        for p in points {
            let panel = panels
                .iter_mut()
                .find(|q| q.title == p.panel)
                .expect("every panel was created");
            let s = series.iter().position(|s| *s == p.series).expect("listed");
            let x = panel.xs.iter().position(|x| *x == p.x).expect("listed");
            panel.values[s][x] = Some(p.value);
        }
        Ok(Figure {
            kind,
            title: title.into(),
            subtitle: subtitle.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
            panels,
            log_allowed: true,
        })
    }

    /// Every value of the figure.
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.panels
            .iter()
            .flat_map(|p| p.values.iter().flatten().flatten().copied())
    }

    /// The y axis shared by all panels: logarithmic when the values span more than
    /// [`LOG_RATIO`], from 0 otherwise; with headroom for the value labels.
    pub fn y_axis(&self) -> YAxis {
        let (lo, hi) = self
            .values()
            .fold((f64::INFINITY, 0.0f64), |(l, h), v| (l.min(v), h.max(v)));
        if self.log_allowed && hi / lo > LOG_RATIO {
            // room below the shortest bar, and above the tallest for its label
            YAxis::Log {
                lo: lo * 0.5,
                hi: hi * 2.5,
            }
        } else {
            YAxis::Linear { hi: hi * 1.18 }
        }
    }
}

/// The y axis a figure is drawn on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum YAxis {
    Linear { hi: f64 },
    Log { lo: f64, hi: f64 },
}

/// The two formats `--plot` writes, by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// The format of `path` (.png or .svg); an error naming the path otherwise.
    pub fn of(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(Error::InvalidArgument(format!(
                "--plot {}: the file must end in .png or .svg",
                path.display()
            ))),
        }
    }
}

/// Checks before measuring that a chart can be written to `path`: a known format and a
/// directory where a file can be created (the write itself is atomic, so a later failure still
/// leaves nothing).
pub fn check_target(path: &Path) -> Result<Format> {
    let format = Format::of(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--plot {}: the directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--plot {}: is a directory",
            path.display()
        )));
    }
    lkconv::safetensors_io::check_writable(path)?;
    Ok(format)
}

/// Draws `fig` and writes it to `path` (PNG or SVG by its extension), atomically.
pub fn render(fig: &Figure, path: &Path) -> Result<()> {
    let format = check_target(path)?;
    let bytes = match format {
        Format::Png => png_bytes(fig)?,
        Format::Svg => svg_bytes(fig)?.into_bytes(),
    };
    lkconv::safetensors_io::write_atomically(path, &bytes)
}

fn size_of(fig: &Figure) -> (u32, u32) {
    (WIDTH, HEADER + PANEL * fig.panels.len().max(1) as u32)
}

fn draw_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("--plot: drawing the chart failed: {e}"))
}

/// The chart as PNG bytes.
pub fn png_bytes(fig: &Figure) -> Result<Vec<u8>> {
    let font = register_font()?;
    let (w, h) = size_of(fig);
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = typeset::Typeset {
            inner: BitMapBackend::with_buffer(&mut rgb, (w, h)),
            font,
        }
        .into_drawing_area();
        draw(&root, fig).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(draw_error)?;
    Ok(png)
}

/// The chart as an SVG document (text as SVG text: the viewer's sans-serif font).
pub fn svg_bytes(fig: &Figure) -> Result<String> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size_of(fig)).into_drawing_area();
        draw(&root, fig).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// The embedded font, registered with plotters (whose layout code measures text with it).
fn register_font() -> Result<&'static ab_glyph::FontRef<'static>> {
    static FONT_REF: std::sync::OnceLock<Option<ab_glyph::FontRef<'static>>> =
        std::sync::OnceLock::new();
    FONT_REF
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).ok()?;
            ab_glyph::FontRef::try_from_slice(FONT).ok()
        })
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("--plot: the embedded font could not be read".into()))
}

/// Series colours (Tableau 10), by the series' index in the figure.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A time in ms with 3 significant digits.
pub fn fmt_ms(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else if v >= 0.001 {
        let digits = (2 - v.log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.1e}")
    }
}

/// An axis tick: [`fmt_ms`] without trailing zeros ("50", "0.1").
fn fmt_tick(v: f64) -> String {
    let s = fmt_ms(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER);
    header.draw(&Text::new(
        fig.title.clone(),
        (14, 8),
        (FAMILY, 22).into_font().color(&BLACK),
    ))?;
    header.draw(&Text::new(
        fig.subtitle.clone(),
        (14, 34),
        (FAMILY, 14).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    draw_legend(&header, fig)?;
    let axis = fig.y_axis();
    let areas = body.split_evenly((fig.panels.len().max(1), 1));
    for (i, (panel, area)) in fig.panels.iter().zip(&areas).enumerate() {
        let last = i + 1 == fig.panels.len();
        match axis {
            YAxis::Linear { hi } => draw_panel(area, fig, panel, 0.0..hi, false, last)?,
            YAxis::Log { lo, hi } => {
                draw_panel(area, fig, panel, (lo..hi).log_scale(), true, last)?
            }
        }
    }
    Ok(())
}

/// The series' colours and names in one row at the header's right edge (shared by all panels).
fn draw_legend<DB: DrawingBackend>(
    header: &DrawingArea<DB, Shift>,
    fig: &Figure,
) -> DrawResult<DB> {
    let font: TextStyle = (FAMILY, 14).into();
    let (swatch, gap) = (14, 18);
    let widths: Vec<i32> = fig
        .series
        .iter()
        .map(|s| header.estimate_text_size(s, &font).map(|(w, _)| w as i32))
        .collect::<std::result::Result<_, _>>()?;
    let total: i32 = widths.iter().map(|w| swatch + 6 + w + gap).sum();
    let mut x = WIDTH as i32 - 24 - total + gap;
    let y = 10;
    for (i, (name, w)) in fig.series.iter().zip(&widths).enumerate() {
        header.draw(&Rectangle::new(
            [(x, y + 2), (x + swatch, y + 2 + swatch)],
            colour(i).filled(),
        ))?;
        header.draw(&Text::new(name.clone(), (x + swatch + 6, y), font.clone()))?;
        x += swatch + 6 + w + gap;
    }
    Ok(())
}

/// The x coordinate of each x position of a panel: bar groups at 0, 1, ..., kernel sizes at
/// their value.
fn x_coords(fig: &Figure, panel: &Panel) -> Vec<f64> {
    panel
        .xs
        .iter()
        .enumerate()
        .map(|(i, x)| match (fig.kind, x) {
            (Kind::KernelSweep, XKey::Kernel(k)) => *k as f64,
            _ => i as f64,
        })
        .collect()
}

/// A linear axis with its ticks exactly at the given positions (bar groups, kernel sizes).
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

fn draw_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    panel: &Panel,
    y_spec: Y,
    log: bool,
    last: bool,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let xs = x_coords(fig, panel);
    let (x0, x1) = match fig.kind {
        Kind::Bars => (-0.5, xs.len() as f64 - 0.5),
        Kind::KernelSweep => {
            let (lo, hi) = (xs[0], xs[xs.len() - 1]);
            let pad = ((hi - lo) * 0.05).max(1.0);
            (lo - pad, hi + pad)
        }
    };
    let labels: Vec<String> = panel.xs.iter().map(XKey::label).collect();
    let label_of = |v: &f64| -> String {
        xs.iter()
            .position(|x| (x - v).abs() < 1e-6)
            .map(|i| labels[i].clone())
            .unwrap_or_default()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 17))
        .margin(10)
        .margin_right(24)
        .x_label_area_size(if last { 44 } else { 26 })
        .y_label_area_size(70)
        .build_cartesian_2d(
            Ticked {
                inner: (x0..x1).into(),
                ticks: xs.clone(),
            },
            y_spec,
        )?;
    let y_desc = if log {
        format!("{} (log scale)", fig.y_label)
    } else {
        fig.y_label.clone()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(if last { fig.x_label.as_str() } else { "" })
        .y_desc(y_desc)
        .x_label_formatter(&label_of)
        .y_label_formatter(&|v: &f64| fmt_tick(*v))
        .y_labels(8)
        .y_max_light_lines(if log { 9 } else { 1 })
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    let n_series = fig.series.len();
    let bars = panel.xs.len() * n_series;
    let base = match fig.y_axis() {
        YAxis::Linear { .. } => 0.0,
        YAxis::Log { lo, .. } => lo,
    };
    for s in 0..n_series {
        let colour = colour(s);
        let row = &panel.values[s];
        let points: Vec<(f64, f64)> = xs
            .iter()
            .zip(row)
            .filter_map(|(&x, v)| v.map(|v| (x, v)))
            .collect();
        if points.is_empty() {
            continue;
        }
        match fig.kind {
            Kind::Bars => {
                let width = 0.8 / n_series as f64;
                let left = |x: f64| x - 0.4 + s as f64 * width;
                chart.draw_series(points.iter().map(|&(x, v)| {
                    let (l, r) = (left(x) + width * 0.06, left(x) + width * 0.94);
                    Rectangle::new([(l, base), (r, v)], colour.filled())
                }))?;
                if bars <= MAX_LABELLED_BARS {
                    let style = (FAMILY, 11)
                        .into_font()
                        .color(&RGBColor(40, 40, 40))
                        .pos(Pos::new(HPos::Center, VPos::Bottom));
                    chart.draw_series(points.iter().map(|&(x, v)| {
                        Text::new(fmt_ms(v), (left(x) + width / 2.0, v), style.clone())
                    }))?;
                }
            }
            Kind::KernelSweep => {
                chart.draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?;
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(panel: &str, series: &str, x: XKey, value: f64) -> Point {
        Point {
            panel: panel.into(),
            series: series.into(),
            x,
            value,
        }
    }

    fn cat(s: &str) -> XKey {
        XKey::Category(s.into())
    }

    #[test]
    fn points_are_arranged_by_panel_series_and_x_in_first_seen_order() {
        let pts = vec![
            point("fwd", "fast", cat("C128"), 4.0),
            point("fwd", "naive", cat("C128"), 40.0),
            point("fwd", "fast", cat("C256"), 2.0),
            point("dgrad", "naive", cat("C256"), 30.0),
            point("dgrad", "im2col", cat("C128"), 9.0),
        ];
        let f = Figure::new(Kind::Bars, "t", "s", "x", "y", &pts).unwrap();
        assert_eq!(f.series, ["fast", "naive", "im2col"]);
        assert_eq!(f.panels.len(), 2);
        let fwd = &f.panels[0];
        assert_eq!(fwd.title, "fwd");
        assert_eq!(fwd.xs, [cat("C128"), cat("C256")]);
        assert_eq!(
            fwd.values,
            [
                vec![Some(4.0), Some(2.0)],
                vec![Some(40.0), None],
                vec![None, None]
            ]
        );
        let dgrad = &f.panels[1];
        assert_eq!(dgrad.xs, [cat("C256"), cat("C128")]);
        assert_eq!(
            dgrad.values,
            [
                vec![None, None],
                vec![Some(30.0), None],
                vec![None, Some(9.0)]
            ]
        );
    }

    #[test]
    fn kernel_sweeps_are_sorted_by_kernel_size() {
        let pts: Vec<Point> = [13, 3, 31, 7]
            .iter()
            .map(|&k| point("fwd", "fast", XKey::Kernel(k), k as f64))
            .collect();
        let f = Figure::new(Kind::KernelSweep, "t", "s", "K", "ms", &pts).unwrap();
        let ks: Vec<XKey> = [3, 7, 13, 31].iter().map(|&k| XKey::Kernel(k)).collect();
        assert_eq!(f.panels[0].xs, ks);
        assert_eq!(
            f.panels[0].values[0],
            [Some(3.0), Some(7.0), Some(13.0), Some(31.0)]
        );
        assert_eq!(x_coords(&f, &f.panels[0]), [3.0, 7.0, 13.0, 31.0]);
    }

    #[test]
    fn the_y_axis_turns_logarithmic_for_wide_ranges() {
        let narrow = [
            point("a", "s", cat("x"), 2.0),
            point("a", "t", cat("x"), 30.0),
        ];
        let f = Figure::new(Kind::Bars, "t", "s", "x", "y", &narrow).unwrap();
        match f.y_axis() {
            YAxis::Linear { hi } => assert!(hi > 30.0 && hi < 40.0, "{hi}"),
            other => panic!("{other:?}"),
        }
        let wide = [
            point("a", "s", cat("x"), 0.05),
            point("a", "t", cat("x"), 300.0),
        ];
        let f = Figure::new(Kind::Bars, "t", "s", "x", "y", &wide).unwrap();
        assert_eq!(
            f.y_axis(),
            YAxis::Log {
                lo: 0.025,
                hi: 750.0
            }
        );
        let linear = Figure {
            log_allowed: false,
            ..f
        };
        assert!(matches!(linear.y_axis(), YAxis::Linear { .. }));
    }

    #[test]
    fn empty_and_unplottable_measurements_are_errors() {
        assert!(Figure::new(Kind::Bars, "t", "s", "x", "y", &[]).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let p = [point("a", "s", cat("x"), bad)];
            assert!(
                Figure::new(Kind::Bars, "t", "s", "x", "y", &p).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(Format::of(Path::new("a/b.png")).unwrap(), Format::Png);
        assert_eq!(Format::of(Path::new("b.SVG")).unwrap(), Format::Svg);
        for bad in ["b.jpg", "b", "png"] {
            assert!(Format::of(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(check_target(Path::new("/no/such/dir/x.png")).is_err());
    }

    #[test]
    fn times_keep_three_significant_digits() {
        assert_eq!(fmt_ms(233.4), "233");
        assert_eq!(fmt_ms(22.04), "22.0");
        assert_eq!(fmt_ms(3.971), "3.97");
        assert_eq!(fmt_ms(0.1634), "0.163");
        assert_eq!(fmt_ms(0.01234), "0.0123");
        assert_eq!(fmt_tick(50.0), "50");
        assert_eq!(fmt_tick(0.1), "0.1");
        assert_eq!(fmt_tick(0.0), "0");
    }

    #[test]
    fn png_and_svg_render() {
        let pts = vec![
            point("fwd", "fast", cat("C128 56x56 K31"), 4.0),
            point("fwd", "naive", cat("C128 56x56 K31"), 400.0),
        ];
        let f = Figure::new(Kind::Bars, "title", "sub", "layer", "ms", &pts).unwrap();
        let png = png_bytes(&f).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = svg_bytes(&f).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("C128 56x56 K31"),
            "{svg}"
        );
    }
}
