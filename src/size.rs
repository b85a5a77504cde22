//! Human-readable sizes (`512M`, `1.5G`, `2GiB`), percentages (`75%`) and durations
//! (`30s`, `2m`, `1h30m`, `500ms`).
//!
//! Every parser says what form it expected, so a typo on the command line gets a message
//! that shows how to write it, never a panic.

use std::time::Duration;

/// Parse a byte size: a number (decimals allowed) with an optional binary suffix
/// (`K`, `M`, `G`, `T`, with or without `i`/`iB`/`B`). Suffixes are powers of 1024, as the
/// kernel's own `memory.max` and every container runtime read them.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let expected = "expected a size such as 512M, 1.5G, 2GiB or 1048576";
    if t.is_empty() {
        return Err(format!("empty size: {expected}"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size '{text}': {expected}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size unit in '{text}': {expected}")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size '{text}' is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parse a percentage `75%` (or a fraction `0.75`) into a fraction in `0.0..=1.0`.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let expected = "expected a percentage such as 75% (or a fraction such as 0.75)";
    let value = if let Some(p) = t.strip_suffix('%') {
        p.trim()
            .parse::<f64>()
            .map_err(|_| format!("invalid percentage '{text}': {expected}"))?
            / 100.0
    } else {
        t.parse::<f64>()
            .map_err(|_| format!("invalid percentage '{text}': {expected}"))?
    };
    if !(0.0..=1.0).contains(&value) {
        return Err(format!(
            "percentage '{text}' is out of range: {expected}, between 0% and 100%"
        ));
    }
    Ok(value)
}

/// Parse a duration: one or more `<number><unit>` parts (`ms`, `s`, `m`, `h`, `d`), e.g.
/// `30s`, `2m`, `1h30m`, `1.5s`, `250ms`. A bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let expected = "expected a duration such as 30s, 2m, 1h30m or 500ms";
    if t.is_empty() {
        return Err(format!("empty duration: {expected}"));
    }
    if let Ok(secs) = t.parse::<f64>() {
        return secs_to_duration(secs)
            .ok_or_else(|| format!("invalid duration '{text}': {expected}"));
    }
    let mut total = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration '{text}': {expected}"))?;
        if split == 0 {
            return Err(format!("invalid duration '{text}': {expected}"));
        }
        let value: f64 = rest[..split]
            .parse()
            .map_err(|_| format!("invalid duration '{text}': {expected}"))?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(format!("invalid unit in duration '{text}': {expected}")),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    secs_to_duration(total).ok_or_else(|| format!("invalid duration '{text}': {expected}"))
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// Bytes for people, the one formatter of trimrun (messages, logs, `trimrun status`,
/// `trimrun trim`): `900 B`, `12.5 KiB`, `512 MiB`, `312.4 MiB`, `1.50 GiB`. Whole values
/// drop their decimals.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if (value - value.round()).abs() < 0.005 {
        format!("{} {}", value.round(), UNITS[unit])
    } else if unit < 3 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// [`human_bytes`] of a difference: `-1.5 MiB` when it is negative.
pub fn human_bytes_signed(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "" };
    format!("{sign}{}", human_bytes(bytes.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_common_form() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2gb").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
    }

    #[test]
    fn bad_sizes_show_the_expected_form() {
        for bad in ["", "M", "12X", "1..2G", "-5M", "abc"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("512M"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_in_every_common_form() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
    }

    #[test]
    fn bad_durations_show_the_expected_form() {
        for bad in ["", "s", "10x", "5 parsecs", "-1s", "1h30"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("30s"), "{bad}: {err}");
        }
    }

    #[test]
    fn fractions_from_percent_or_decimal() {
        assert_eq!(parse_fraction("75%").unwrap(), 0.75);
        assert_eq!(parse_fraction("0.9").unwrap(), 0.9);
        assert!(parse_fraction("120%").unwrap_err().contains("75%"));
        assert!(parse_fraction("x").is_err());
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(312 * (1 << 20) + 400 * 1024), "312.4 MiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes_signed(-(3 << 19)), "-1.5 MiB");
        assert_eq!(human_bytes_signed(2048), "2 KiB");
    }
}
