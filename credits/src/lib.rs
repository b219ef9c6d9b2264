//! Exact credit amounts.
//!
//! Inside the host and its extensions every amount is an integer number of
//! micro-credits (1 credit = 1_000_000 µcr). Decimal credits with at most six
//! places appear only at the edges: command-line arguments, config values and
//! printed output. This crate owns both conversions and the one pricing rule
//! extensions share (`prorate`), so no floating-point number ever touches an
//! amount.

use std::fmt;

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;

/// Decimal places a credit amount may have.
pub const MAX_DECIMAL_PLACES: usize = 6;

/// Why a text is not an amount of credits. Every message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseCreditsError {
    Empty,
    Negative(String),
    TooPrecise(String),
    NotANumber(String),
    TooLarge(String),
}

impl fmt::Display for ParseCreditsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "an amount of credits is required, got an empty value"),
            Self::Negative(input) => {
                write!(
                    f,
                    "\"{input}\" is negative: amounts of credits must be zero or more"
                )
            }
            Self::TooPrecise(input) => write!(
                f,
                "\"{input}\" has more than {MAX_DECIMAL_PLACES} decimal places: the smallest amount is 0.000001 credits"
            ),
            Self::NotANumber(input) => write!(
                f,
                "\"{input}\" is not an amount of credits: expected a decimal number such as 25 or 0.5"
            ),
            Self::TooLarge(input) => write!(
                f,
                "\"{input}\" is too large: the largest amount is {}",
                format_micros(i64::MAX as i128)
            ),
        }
    }
}

impl std::error::Error for ParseCreditsError {}

/// Parses decimal credits ("25", "0.5", "0.000001") into micro-credits.
///
/// Accepts digits with an optional fractional part of 1 to 6 digits. Rejects
/// signs, exponents, spaces, more than six places, and anything above
/// `i64::MAX` micro-credits (so any parsed amount also fits a signed balance).
pub fn parse_credits(input: &str) -> Result<u64, ParseCreditsError> {
    let text = input;
    if text.is_empty() {
        return Err(ParseCreditsError::Empty);
    }
    if let Some(rest) = text.strip_prefix('-') {
        return if parse_credits(rest).is_ok() {
            Err(ParseCreditsError::Negative(input.to_string()))
        } else {
            Err(ParseCreditsError::NotANumber(input.to_string()))
        };
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|fraction| !all_digits(fraction)) {
        return Err(ParseCreditsError::NotANumber(input.to_string()));
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > MAX_DECIMAL_PLACES {
        // Trailing zeros beyond the sixth place carry no value; anything else
        // would have to be rounded, which an amount of money never is.
        if fraction[MAX_DECIMAL_PLACES..].bytes().any(|b| b != b'0') {
            return Err(ParseCreditsError::TooPrecise(input.to_string()));
        }
    }
    let too_large = || ParseCreditsError::TooLarge(input.to_string());
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut fraction_micros: u64 = 0;
    for (place, digit) in fraction.bytes().take(MAX_DECIMAL_PLACES).enumerate() {
        fraction_micros +=
            u64::from(digit - b'0') * 10u64.pow((MAX_DECIMAL_PLACES - 1 - place) as u32);
    }
    let micros = whole
        .checked_mul(MICROS_PER_CREDIT)
        .and_then(|micros| micros.checked_add(fraction_micros))
        .filter(|micros| *micros <= i64::MAX as u64)
        .ok_or_else(too_large)?;
    Ok(micros)
}

/// Shows micro-credits as decimal credits with exactly six places:
/// `25_000_000` is `"25.000000"`, `-1` is `"-0.000001"`.
pub fn format_micros(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    let per_credit = u128::from(MICROS_PER_CREDIT);
    format!(
        "{sign}{}.{:06}",
        magnitude / per_credit,
        magnitude % per_credit
    )
}

/// `format_micros` for the unsigned amounts extensions deal in.
pub fn format_credits(micros: u64) -> String {
    format_micros(i128::from(micros))
}

/// Prices a use of a resource at an hourly rate, rounding up to the next
/// micro-credit: `rate_per_hour` micro-credits per unit-hour, times
/// `quantity_numerator / quantity_denominator` units, for `duration_ms`.
///
/// For example 0.05 credits per vCPU-hour for 1500 cpu-millis over 90
/// seconds is `prorate(50_000, 1500, 1000, 90_000)`. Returns `None` when the
/// result does not fit in a `u64` or the denominator is zero.
pub fn prorate(
    rate_per_hour: u64,
    quantity_numerator: u64,
    quantity_denominator: u64,
    duration_ms: u64,
) -> Option<u64> {
    const MS_PER_HOUR: u128 = 3_600_000;
    if quantity_denominator == 0 {
        return None;
    }
    let numerator = u128::from(rate_per_hour)
        .checked_mul(u128::from(quantity_numerator))?
        .checked_mul(u128::from(duration_ms))?;
    let denominator = u128::from(quantity_denominator) * MS_PER_HOUR;
    u64::try_from(numerator.div_ceil(denominator)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_and_fractional_credits() {
        assert_eq!(parse_credits("25"), Ok(25_000_000));
        assert_eq!(parse_credits("0.5"), Ok(500_000));
        assert_eq!(parse_credits("0.000001"), Ok(1));
        assert_eq!(
            parse_credits(" 1.25 "),
            Err(ParseCreditsError::NotANumber(" 1.25 ".into())),
            "an amount is exactly its digits: no spaces"
        );
        assert_eq!(parse_credits("0"), Ok(0));
        assert_eq!(
            parse_credits("1.5000000"),
            Ok(1_500_000),
            "zeros past the sixth place are exact"
        );
    }

    #[test]
    fn rejects_what_is_not_an_exact_amount() {
        assert_eq!(
            parse_credits("-5"),
            Err(ParseCreditsError::Negative("-5".into()))
        );
        assert_eq!(
            parse_credits("0.0000001"),
            Err(ParseCreditsError::TooPrecise("0.0000001".into()))
        );
        for bad in [
            "abc", "1e3", "+1", "1.", ".5", "1.2.3", "--1", "1 000", "NaN", "inf", "0x10",
        ] {
            assert_eq!(
                parse_credits(bad),
                Err(ParseCreditsError::NotANumber(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(parse_credits(""), Err(ParseCreditsError::Empty));
        let too_large = "9223372036854.775808";
        assert_eq!(
            parse_credits(too_large),
            Err(ParseCreditsError::TooLarge(too_large.into()))
        );
        assert_eq!(parse_credits("9223372036854.775807"), Ok(i64::MAX as u64));
        assert!(parse_credits("99999999999999999999999").is_err());
    }

    #[test]
    fn error_messages_quote_the_input() {
        for bad in ["-5", "0.0000001", "abc", "99999999999999999999"] {
            let message = parse_credits(bad).unwrap_err().to_string();
            assert!(message.contains(&format!("\"{bad}\"")), "{message}");
        }
    }

    #[test]
    fn formats_with_six_places_and_round_trips() {
        assert_eq!(format_micros(25_000_000), "25.000000");
        assert_eq!(format_micros(-1), "-0.000001");
        assert_eq!(format_micros(0), "0.000000");
        assert_eq!(format_credits(1_234_567), "1.234567");
        for micros in [0u64, 1, 999_999, 1_000_000, 123_456_789, i64::MAX as u64] {
            assert_eq!(parse_credits(&format_credits(micros)), Ok(micros));
        }
    }

    #[test]
    fn prorate_rounds_up_to_the_next_micro_credit() {
        // 0.05 cr per vCPU-hour, 1.5 vCPU, 90 s: 0.05 * 1.5 * 90 / 3600 = 0.001875 cr.
        assert_eq!(prorate(50_000, 1500, 1000, 90_000), Some(1_875));
        // One millisecond of 1 cr/hour is 0.000000277... cr: charged as 1 µcr.
        assert_eq!(prorate(1_000_000, 1, 1, 1), Some(1));
        assert_eq!(prorate(0, 1, 1, 1_000_000), Some(0));
        assert_eq!(prorate(1, 1, 0, 1), None);
        assert_eq!(prorate(u64::MAX, u64::MAX, 1, u64::MAX), None);
    }
}
