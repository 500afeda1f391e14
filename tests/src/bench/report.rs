//! The figures of a run: printed as a table with the ratio of cutover to
//! each peer, and written as JSON.

use std::fmt::Write as _;

use super::context::CpuUse;

/// Whether a smaller or a larger value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Times, lags, memory.
    Lower,
    /// Throughputs.
    Higher,
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// `copy`, `apply-1`, `apply-100`, `lag`, `memory`.
    pub scenario: String,
    /// `cutover`, `native`, `pg_dump|pg_restore`, `pgcopydb`.
    pub contestant: String,
    /// What was measured (`time`, `MB/s`, `changes/s`, `p99`, ...).
    pub metric: String,
    /// The value (median over rounds when there are several).
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Which direction is better.
    pub better: Better,
    /// Every round's value.
    pub rounds: Vec<f64>,
    /// Whether the contestant's result was verified (equal tables).
    pub verified: bool,
    /// Anything that qualifies the figure.
    pub note: String,
}

/// All figures of a run, with the conditions they were measured under.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<Figure>,
    /// Machine, versions, settings.
    pub environment: Vec<(String, String)>,
}

impl Report {
    /// Records one round's value; rounds of the same figure are merged.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        scenario: &str,
        contestant: &str,
        metric: &str,
        value: f64,
        unit: &str,
        better: Better,
        verified: bool,
        note: &str,
    ) {
        println!(
            "  {scenario:<10} {contestant:<20} {metric:<14} {value:>12.2} {unit}{}",
            if verified { "" } else { "  (NOT VERIFIED)" }
        );
        if let Some(f) = self
            .figures
            .iter_mut()
            .find(|f| f.scenario == scenario && f.contestant == contestant && f.metric == metric)
        {
            f.rounds.push(value);
            f.value = median(&f.rounds);
            f.verified &= verified;
            if !note.is_empty() && !f.note.contains(note) {
                if !f.note.is_empty() {
                    f.note.push_str("; ");
                }
                f.note.push_str(note);
            }
            return;
        }
        self.figures.push(Figure {
            scenario: scenario.to_owned(),
            contestant: contestant.to_owned(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            better,
            rounds: vec![value],
            verified,
            note: note.to_owned(),
        });
    }

    /// Records one round's CPU time (`CPU-s`, lower is better), its split
    /// per server and tool in the note after `prefix`.
    pub fn record_cpu(
        &mut self,
        scenario: &str,
        contestant: &str,
        cpu: &CpuUse,
        verified: bool,
        prefix: &str,
    ) {
        self.record(
            scenario,
            contestant,
            "CPU time",
            cpu.total(),
            "CPU-s",
            Better::Lower,
            verified,
            &format!("{prefix}{}", cpu.describe()),
        );
    }

    /// The figures.
    pub fn figures(&self) -> &[Figure] {
        &self.figures
    }

    /// cutover's figure for the same scenario and metric.
    fn cutover_of(&self, figure: &Figure) -> Option<&Figure> {
        self.figures.iter().find(|f| {
            f.contestant == "cutover" && f.scenario == figure.scenario && f.metric == figure.metric
        })
    }

    /// The comparison of cutover with the peer of `figure`, in words.
    pub fn verdict(&self, figure: &Figure) -> String {
        if figure.contestant.starts_with("cutover") {
            return String::new();
        }
        let Some(ours) = self.cutover_of(figure) else {
            return String::new();
        };
        if figure.value <= 0.0 || ours.value <= 0.0 {
            return "n/a".to_owned();
        }
        let ratio = ours.value / figure.value;
        let factor = match figure.better {
            Better::Lower => figure.value / ours.value,
            Better::Higher => ratio,
        };
        let word = match (figure.better, factor >= 1.0) {
            (Better::Lower, true) if figure.unit == "MB" || figure.unit == "CPU-s" => "less",
            (Better::Lower, false) if figure.unit == "MB" || figure.unit == "CPU-s" => "more",
            (Better::Lower, true) if figure.unit == "ms" => "lower",
            (Better::Lower, false) if figure.unit == "ms" => "higher",
            (_, true) => "faster",
            (_, false) => "slower",
        };
        let factor = if factor >= 1.0 { factor } else { 1.0 / factor };
        format!("{ratio:.2} (cutover {factor:.2}x {word})")
    }

    /// The table of every figure with cutover/peer ratios, as Markdown.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| scenario | metric | contestant | value | cutover/peer | note |"
        );
        let _ = writeln!(out, "|---|---|---|---:|---|---|");
        for f in &self.figures {
            let rounds = if f.rounds.len() > 1 {
                format!(" (median of {})", f.rounds.len())
            } else {
                String::new()
            };
            let verified = if f.verified { "" } else { "NOT VERIFIED " };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} {}{} | {} | {}{} |",
                f.scenario,
                f.metric,
                f.contestant,
                f.value,
                f.unit,
                rounds,
                self.verdict(f),
                verified,
                f.note
            );
        }
        out
    }

    /// Everything as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let figures: Vec<serde_json::Value> = self
            .figures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "scenario": f.scenario,
                    "contestant": f.contestant,
                    "metric": f.metric,
                    "value": f.value,
                    "unit": f.unit,
                    "better": match f.better { Better::Lower => "lower", Better::Higher => "higher" },
                    "rounds": f.rounds,
                    "verified": f.verified,
                    "cutover_over_peer": self.cutover_of(f)
                        .filter(|_| !f.contestant.starts_with("cutover") && f.value > 0.0)
                        .map(|ours| ours.value / f.value),
                    "note": f.note,
                })
            })
            .collect();
        let environment: serde_json::Map<String, serde_json::Value> = self
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::json!({ "environment": environment, "figures": figures })
    }
}

/// The median (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) by nearest rank.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_medians_by_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn verdicts_say_which_way_and_how_much() {
        let mut r = Report::default();
        r.record(
            "copy",
            "cutover",
            "time",
            10.0,
            "s",
            Better::Lower,
            true,
            "",
        );
        r.record("copy", "native", "time", 20.0, "s", Better::Lower, true, "");
        r.record(
            "apply-1",
            "cutover",
            "changes/s",
            5000.0,
            "changes/s",
            Better::Higher,
            true,
            "",
        );
        r.record(
            "apply-1",
            "native",
            "changes/s",
            10000.0,
            "changes/s",
            Better::Higher,
            true,
            "",
        );
        let native_copy = &r.figures()[1];
        assert_eq!(r.verdict(native_copy), "0.50 (cutover 2.00x faster)");
        let native_apply = &r.figures()[3];
        assert_eq!(r.verdict(native_apply), "0.50 (cutover 2.00x slower)");
    }
}
