//! Plots drawn with plotters' bitmap backend and an 8x8 bitmap font (font8x8), so no system
//! fonts are needed: the drawing helpers, and the experiment's perplexity against training
//! FLOPs.

use std::path::Path;

use anyhow::Result;
use btm_model::experiment::{self, Report};

use plotters::prelude::*;

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

pub(crate) fn text(area: &Area, s: &str, x: i32, y: i32, color: &RGBColor) {
    for (k, ch) in s.chars().enumerate() {
        let code = ch as usize;
        let glyph = if code < 128 {
            font8x8::legacy::BASIC_LEGACY[code]
        } else {
            font8x8::legacy::BASIC_LEGACY[b'?' as usize]
        };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let _ = area.draw_pixel((x + 8 * k as i32 + col, y + row as i32), color);
                }
            }
        }
    }
}

pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(0, 0, 0),
    RGBColor(220, 50, 32),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(230, 159, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(140, 80, 20),
    RGBColor(90, 0, 160),
];

/// Draws `results.png`: mean in-domain and out-of-domain perplexity against training FLOPs.
pub fn plot(r: &Report, path: &Path) -> Result<()> {
    let (w, h) = (1100u32, 620u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    // Curves: dense learning curve; btm (seed -> forest). Points: every final system.
    let shown: Vec<&experiment::SystemResult> = r
        .systems
        .iter()
        .filter(|s| {
            [
                "dense",
                "seed",
                "btm_ensemble",
                "btm_ensemble_topk",
                "btm_average_posterior",
                "btm_average_uniform",
                "random_split_ensemble",
                "no_seed_ensemble",
                "no_seed_average_posterior",
                "demix",
            ]
            .contains(&s.name.as_str())
        })
        .collect();
    let xmax = r
        .curves
        .iter()
        .map(|c| c.flops)
        .chain(shown.iter().map(|s| s.train_flops))
        .fold(0.0, f64::max)
        * 1.05;
    text(
        &root,
        &format!(
            "BTM vs compute-matched baselines ({} params, {} updates)",
            r.params, r.plan.dense_steps
        ),
        20,
        8,
        &BLACK,
    );
    for (panel, title) in [
        (0usize, "in-domain (8 training domains)"),
        (1, "out-of-domain (4 eval-only domains)"),
    ] {
        let x0 = 70 + panel as i32 * 540;
        let (pw, ph, y0) = (440i32, 380i32, 40i32);
        let val = |s: &experiment::SystemResult| if panel == 0 { s.mean_in } else { s.mean_out };
        let cval = |c: &experiment::CurvePoint| if panel == 0 { c.mean_in } else { c.mean_out };
        let ys: Vec<f64> = shown
            .iter()
            .map(|s| val(s))
            .chain(r.curves.iter().map(cval))
            .filter(|v| v.is_finite())
            .collect();
        let (mut ymin, mut ymax) = (
            ys.iter().copied().fold(f64::INFINITY, f64::min),
            ys.iter().copied().fold(0.0, f64::max),
        );
        if !(ymin.is_finite() && ymax > ymin) {
            ymin = 0.0;
            ymax = 1.0;
        }
        let pad = 0.06 * (ymax - ymin);
        let (ymin, ymax) = (ymin - pad, ymax + pad);
        let px = |x: f64| x0 + ((x / xmax.max(1e-9)) * pw as f64) as i32;
        let py = |y: f64| y0 + ph - (((y - ymin) / (ymax - ymin)) * ph as f64) as i32;
        let axis = ShapeStyle::from(&BLACK).stroke_width(1);
        let _ = root.draw(&Rectangle::new([(x0, y0), (x0 + pw, y0 + ph)], axis));
        text(&root, title, x0 + 10, y0 - 14, &BLACK);
        for i in 0..=4 {
            let yv = ymin + (ymax - ymin) * i as f64 / 4.0;
            let y = py(yv);
            let _ = root.draw(&PathElement::new(vec![(x0 - 4, y), (x0, y)], axis));
            text(&root, &format!("{yv:.1}"), x0 - 60, y - 4, &BLACK);
            let xv = xmax * i as f64 / 4.0;
            let x = px(xv);
            let _ = root.draw(&PathElement::new(
                vec![(x, y0 + ph), (x, y0 + ph + 4)],
                axis,
            ));
            text(&root, &format!("{xv:.1e}"), x - 28, y0 + ph + 8, &BLACK);
        }
        text(
            &root,
            "training FLOPs",
            x0 + pw / 2 - 56,
            y0 + ph + 22,
            &BLACK,
        );
        text(&root, "ppl", x0 - 60, y0 - 14, &BLACK);
        for (k, sys) in ["dense", "btm"].iter().enumerate() {
            let pts: Vec<(i32, i32)> = r
                .curves
                .iter()
                .filter(|c| c.system == *sys)
                .map(|c| (px(c.flops), py(cval(c))))
                .collect();
            let color = PALETTE[k];
            let _ = root.draw(&PathElement::new(
                pts.clone(),
                ShapeStyle::from(&color).stroke_width(2),
            ));
            for p in pts {
                let _ = root.draw(&Circle::new(p, 3, color.filled()));
            }
        }
        for (k, s) in shown.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let v = val(s);
            if v.is_finite() {
                let _ = root.draw(&Circle::new(
                    (px(s.train_flops), py(v)),
                    5,
                    ShapeStyle::from(&color).stroke_width(2),
                ));
            }
        }
    }
    // Legend: one line per system with its colour and both means.
    for (k, s) in shown.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let (col, row) = (k / 5, k % 5);
        let (x, y) = (70 + col as i32 * 540, 480 + row as i32 * 22);
        let _ = root.draw(&Circle::new(
            (x + 4, y + 4),
            5,
            ShapeStyle::from(&color).stroke_width(2),
        ));
        text(
            &root,
            &format!(
                "{:<26} in {:>8.2}  out {:>8.2}",
                s.name, s.mean_in, s.mean_out
            ),
            x + 16,
            y,
            &color,
        );
    }
    text(
        &root,
        "lines: dense learning curve (black), seed -> BTM ensemble (red)",
        20,
        h as i32 - 14,
        &BLACK,
    );
    root.present()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// One point of a comparison plot: an x value and, per panel (in, out of domain), the mean and
/// standard deviation of each series.
pub struct ComparePoint {
    /// The x value (training FLOPs or seed share).
    pub x: f64,
    /// Label under the point.
    pub label: String,
    /// `series[s][panel]` = (mean, sd) of series `s`.
    pub series: Vec<[(f64, f64); 2]>,
}

/// Draws a comparison of finished experiments: per panel (in domain, out of domain), each
/// series' relative difference to the dense LM in percent (mean ± sd over seeds, as error bars)
/// against `x_name`; the zero line is the dense LM.
pub fn plot_compare(
    title: &str,
    x_name: &str,
    log_x: bool,
    series: &[&str],
    points: &[ComparePoint],
    path: &Path,
) -> Result<()> {
    let (w, h) = (1100u32, 560u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    text(&root, title, 20, 8, &BLACK);
    let xs: Vec<f64> = points
        .iter()
        .map(|p| if log_x { p.x.log10() } else { p.x })
        .collect();
    let (mut xmin, mut xmax) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    if !xmin.is_finite() || !xmax.is_finite() || xmax <= xmin {
        if !xmin.is_finite() || !xmax.is_finite() {
            (xmin, xmax) = (0.0, 0.0);
        }
        xmin -= 0.5;
        xmax += 0.5;
    }
    let xpad = 0.1 * (xmax - xmin);
    let (xmin, xmax) = (xmin - xpad, xmax + xpad);
    for (panel, ptitle) in [(0usize, "in domain"), (1, "out of domain")] {
        let x0 = 80 + panel as i32 * 540;
        let (pw, ph, y0) = (440i32, 380i32, 40i32);
        let mut ys = vec![0.0f64];
        for p in points {
            for s in &p.series {
                let (m, sd) = s[panel];
                if m.is_finite() {
                    ys.push(m - sd);
                    ys.push(m + sd);
                }
            }
        }
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let ymax = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = 0.08 * (ymax - ymin).max(1.0);
        let (ymin, ymax) = (ymin - pad, ymax + pad);
        let px = |x: f64| x0 + (((x - xmin) / (xmax - xmin)) * pw as f64) as i32;
        let py = |y: f64| y0 + ph - (((y - ymin) / (ymax - ymin)) * ph as f64) as i32;
        let axis = ShapeStyle::from(&BLACK).stroke_width(1);
        let _ = root.draw(&Rectangle::new([(x0, y0), (x0 + pw, y0 + ph)], axis));
        text(
            &root,
            &format!("{ptitle}: % vs dense"),
            x0 + 10,
            y0 - 14,
            &BLACK,
        );
        let zero = ShapeStyle::from(&RGBColor(150, 150, 150)).stroke_width(1);
        let _ = root.draw(&PathElement::new(
            vec![(x0, py(0.0)), (x0 + pw, py(0.0))],
            zero,
        ));
        for i in 0..=4 {
            let yv = ymin + (ymax - ymin) * i as f64 / 4.0;
            let y = py(yv);
            let _ = root.draw(&PathElement::new(vec![(x0 - 4, y), (x0, y)], axis));
            text(&root, &format!("{yv:+.1}%"), x0 - 64, y - 4, &BLACK);
        }
        for (p, &x) in points.iter().zip(&xs) {
            let _ = root.draw(&PathElement::new(
                vec![(px(x), y0 + ph), (px(x), y0 + ph + 4)],
                axis,
            ));
            text(
                &root,
                &p.label,
                px(x) - 4 * p.label.len() as i32,
                y0 + ph + 8,
                &BLACK,
            );
        }
        text(
            &root,
            x_name,
            x0 + pw / 2 - 4 * x_name.len() as i32,
            y0 + ph + 24,
            &BLACK,
        );
        for (k, _) in series.iter().enumerate() {
            let color = PALETTE[(k + 1) % PALETTE.len()];
            let style = ShapeStyle::from(&color).stroke_width(2);
            let pts: Vec<(i32, i32)> = points
                .iter()
                .zip(&xs)
                .filter(|(p, _)| p.series[k][panel].0.is_finite())
                .map(|(p, &x)| (px(x) + 3 * k as i32, py(p.series[k][panel].0)))
                .collect();
            let _ = root.draw(&PathElement::new(pts.clone(), style));
            for ((p, _), &(x, y)) in points
                .iter()
                .zip(&xs)
                .filter(|(p, _)| p.series[k][panel].0.is_finite())
                .zip(&pts)
            {
                let (m, sd) = p.series[k][panel];
                let _ = root.draw(&PathElement::new(
                    vec![(x, py(m - sd)), (x, py(m + sd))],
                    style,
                ));
                let _ = root.draw(&Circle::new((x, y), 4, color.filled()));
            }
        }
    }
    for (k, name) in series.iter().enumerate() {
        let color = PALETTE[(k + 1) % PALETTE.len()];
        let (x, y) = (80 + (k as i32 % 3) * 340, 470 + (k as i32 / 3) * 20);
        let _ = root.draw(&Circle::new((x + 4, y + 4), 4, color.filled()));
        text(&root, name, x + 16, y, &color);
    }
    text(
        &root,
        "mean +- sd over seeds of (system - dense) / dense; below zero: better than the dense LM",
        20,
        h as i32 - 16,
        &BLACK,
    );
    root.present()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
