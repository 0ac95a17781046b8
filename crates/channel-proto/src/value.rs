//! PHP `serialize()` values: the plain-data subset (null, bool, int, float, string, array).
//!
//! Objects (`O:`, `C:`), references (`r:`, `R:`) and enums (`E:`) are refused: a PHP server would
//! instantiate them, we only ever accept data. Nesting is limited to [`MAX_DEPTH`] so that hostile
//! input cannot exhaust the stack, and declared sizes are checked against the bytes actually
//! present before anything is allocated.

use std::fmt::Write as _;

/// Deepest array nesting accepted.
pub const MAX_DEPTH: usize = 64;

/// An array key: PHP arrays are ordered maps keyed by integers or strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    Int(i64),
    Str(Vec<u8>),
}

/// A plain PHP value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// PHP strings are bytes; they are usually, not always, UTF-8.
    Str(Vec<u8>),
    /// Ordered key/value pairs.
    Array(Vec<(Key, Value)>),
}

/// Why a payload is not a plain serialized value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("serialized value ends early at byte {0}")]
    Truncated(usize),
    #[error("unexpected byte {found:?} at {pos}, expected {expected}")]
    Unexpected { pos: usize, found: char, expected: &'static str },
    #[error("PHP {0} values are refused: only plain data is accepted")]
    Forbidden(&'static str),
    #[error("bad number at byte {0}")]
    BadNumber(usize),
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

impl Value {
    /// Parse exactly one value that fills the whole of `input`.
    pub fn parse(input: &[u8]) -> Result<Value, ValueError> {
        let mut p = Parser { buf: input, pos: 0 };
        let v = p.value(0)?;
        match input.len() - p.pos {
            0 => Ok(v),
            n => Err(ValueError::Trailing(n)),
        }
    }

    /// Serialize like PHP's `serialize()`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// Append the serialized form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"N;"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"b:1;" } else { b"b:0;" }),
            Value::Int(i) => push_fmt(out, format_args!("i:{i};")),
            Value::Float(f) => {
                out.extend_from_slice(b"d:");
                out.extend_from_slice(php_float(*f).as_bytes());
                out.push(b';');
            }
            Value::Str(s) => encode_str(s, out),
            Value::Array(items) => {
                push_fmt(out, format_args!("a:{}:{{", items.len()));
                for (k, v) in items {
                    match k {
                        Key::Int(i) => push_fmt(out, format_args!("i:{i};")),
                        Key::Str(s) => encode_str(s, out),
                    }
                    v.encode_into(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The value under string key `key`, if this is an array that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Array(items) => items.iter().find_map(|(k, v)| match k {
                Key::Str(s) if s == key.as_bytes() => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// A string value's bytes.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as PHP would turn a scalar into a string (`(string)$v`); arrays give `None`.
    pub fn to_php_string(&self) -> Option<Vec<u8>> {
        Some(match self {
            Value::Null | Value::Bool(false) => Vec::new(),
            Value::Bool(true) => b"1".to_vec(),
            Value::Int(i) => i.to_string().into_bytes(),
            Value::Float(f) => php_float(*f).into_bytes(),
            Value::Str(s) => s.clone(),
            Value::Array(_) => return None,
        })
    }

    /// A string-keyed array from pairs, a convenience for building payloads.
    pub fn assoc<const N: usize>(pairs: [(&str, Value); N]) -> Value {
        Value::Array(pairs.into_iter().map(|(k, v)| (Key::Str(k.as_bytes().to_vec()), v)).collect())
    }

    /// A PHP list (keys 0..n-1).
    pub fn list(items: impl IntoIterator<Item = Value>) -> Value {
        Value::Array(items.into_iter().enumerate().map(|(i, v)| (Key::Int(i as i64), v)).collect())
    }

    /// A string value.
    pub fn str(s: impl AsRef<[u8]>) -> Value {
        Value::Str(s.as_ref().to_vec())
    }
}

/// Parse a serialized array and give each of its top-level entries: the key, the byte range of the
/// value within `input` (so callers can keep a value's bytes as they are), and the parsed value.
pub fn array_spans(input: &[u8]) -> Result<Vec<(Key, std::ops::Range<usize>, Value)>, ValueError> {
    let mut p = Parser { buf: input, pos: 0 };
    let tag = p.peek()?;
    if tag != b'a' {
        return Err(ValueError::Unexpected { pos: 0, found: tag as char, expected: "an array" });
    }
    p.pos += 1;
    p.expect(b':', "':' after a type tag")?;
    let count = p.len_until(b':')?;
    p.expect(b'{', "'{'")?;
    let mut spans = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let key = p.key(1)?;
        let start = p.pos;
        let value = p.value(1)?;
        spans.push((key, start..p.pos, value));
    }
    p.expect(b'}', "'}' closing an array")?;
    match input.len() - p.pos {
        0 => Ok(spans),
        n => Err(ValueError::Trailing(n)),
    }
}

fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    let mut s = String::new();
    let _ = s.write_fmt(args);
    out.extend_from_slice(s.as_bytes());
}

/// Append `s:<len>:"<bytes>";`.
pub fn encode_str(s: &[u8], out: &mut Vec<u8>) {
    push_fmt(out, format_args!("s:{}:\"", s.len()));
    out.extend_from_slice(s);
    out.extend_from_slice(b"\";");
}

/// Format a float as PHP does with `serialize_precision = -1`: the shortest digits that round-trip,
/// fixed notation unless the exponent is below -4 or above 15, then `1.0E+25` style.
pub fn php_float(f: f64) -> String {
    if f.is_nan() {
        return "NAN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "INF".into() } else { "-INF".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    // `{:e}` gives the shortest round-trip digits: "-1.25e-7".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1;
    let mut out = String::new();
    if f < 0.0 {
        out.push('-');
    }
    if !(-3..=17).contains(&decpt) {
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() { "0" } else { rest };
        let _ = write!(out, "{first}.{rest}E{}{}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-decpt) as usize));
        out.push_str(&digits);
    } else {
        let decpt = decpt as usize;
        if digits.len() <= decpt {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', decpt - digits.len()));
        } else {
            out.push_str(&digits[..decpt]);
            out.push('.');
            out.push_str(&digits[decpt..]);
        }
    }
    out
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Result<u8, ValueError> {
        self.buf.get(self.pos).copied().ok_or(ValueError::Truncated(self.pos))
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), ValueError> {
        let found = self.peek()?;
        if found != byte {
            return Err(ValueError::Unexpected { pos: self.pos, found: found as char, expected });
        }
        self.pos += 1;
        Ok(())
    }

    /// The bytes up to (not including) `end`, which is consumed.
    fn until(&mut self, end: u8) -> Result<&[u8], ValueError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = rest.iter().position(|b| *b == end).ok_or(ValueError::Truncated(self.buf.len()))?;
        let start = self.pos;
        self.pos += n + 1;
        Ok(&self.buf[start..start + n])
    }

    fn int_until(&mut self, end: u8) -> Result<i64, ValueError> {
        let start = self.pos;
        let text = self.until(end)?;
        std::str::from_utf8(text)
            .ok()
            .filter(|t| !t.starts_with('+'))
            .and_then(|t| t.parse().ok())
            .ok_or(ValueError::BadNumber(start))
    }

    fn len_until(&mut self, end: u8) -> Result<usize, ValueError> {
        let start = self.pos;
        usize::try_from(self.int_until(end)?).map_err(|_| ValueError::BadNumber(start))
    }

    fn string_body(&mut self) -> Result<Vec<u8>, ValueError> {
        let len = self.len_until(b':')?;
        self.expect(b'"', "'\"'")?;
        let end = self.pos.checked_add(len).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(ValueError::Truncated(self.buf.len()))?;
        let s = self.buf[self.pos..end].to_vec();
        self.pos = end;
        self.expect(b'"', "'\"' closing a string")?;
        self.expect(b';', "';'")?;
        Ok(s)
    }

    fn key(&mut self, depth: usize) -> Result<Key, ValueError> {
        let key_pos = self.pos;
        match self.value(depth)? {
            Value::Int(i) => Ok(Key::Int(i)),
            Value::Str(s) => Ok(Key::Str(s)),
            _ => {
                let found = self.buf.get(key_pos).map_or('?', |b| *b as char);
                Err(ValueError::Unexpected { pos: key_pos, found, expected: "an int or string key" })
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ValueError> {
        let tag_pos = self.pos;
        let tag = self.peek()?;
        self.pos += 1;
        if tag == b'N' {
            self.expect(b';', "';' after N")?;
            return Ok(Value::Null);
        }
        match tag {
            b'O' | b'C' => return Err(ValueError::Forbidden("object")),
            b'r' | b'R' => return Err(ValueError::Forbidden("reference")),
            b'E' => return Err(ValueError::Forbidden("enum")),
            _ => {}
        }
        self.expect(b':', "':' after a type tag")?;
        match tag {
            b'b' => match self.until(b';')? {
                b"0" => Ok(Value::Bool(false)),
                b"1" => Ok(Value::Bool(true)),
                _ => Err(ValueError::BadNumber(tag_pos + 2)),
            },
            b'i' => Ok(Value::Int(self.int_until(b';')?)),
            b'd' => {
                let start = self.pos;
                let text = self.until(b';')?;
                parse_float(text).map(Value::Float).ok_or(ValueError::BadNumber(start))
            }
            b's' => Ok(Value::Str(self.string_body()?)),
            b'a' => {
                if depth >= MAX_DEPTH {
                    return Err(ValueError::TooDeep);
                }
                let count = self.len_until(b':')?;
                self.expect(b'{', "'{'")?;
                // Each pair takes at least 8 bytes ("i:0;N;"... ), so never trust count beyond that.
                let room = (self.buf.len() - self.pos) / 6;
                let mut items = Vec::with_capacity(count.min(room));
                for _ in 0..count {
                    let key = self.key(depth + 1)?;
                    items.push((key, self.value(depth + 1)?));
                }
                self.expect(b'}', "'}' closing an array")?;
                Ok(Value::Array(items))
            }
            other => Err(ValueError::Unexpected { pos: tag_pos, found: other as char, expected: "a value type tag" }),
        }
    }
}

fn parse_float(text: &[u8]) -> Option<f64> {
    match text {
        b"INF" => Some(f64::INFINITY),
        b"-INF" => Some(f64::NEG_INFINITY),
        b"NAN" => Some(f64::NAN),
        _ => {
            let t = std::str::from_utf8(text).ok()?;
            // Rust also accepts "inf"/"nan" spellings that PHP never writes; refuse them.
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) {
                return None;
            }
            t.parse().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_like_php() {
        for (f, s) in [
            (1.5, "1.5"),
            (-0.25, "-0.25"),
            (3.0, "3"),
            (1e25, "1.0E+25"),
            (1.5e-7, "1.5E-7"),
            (0.0001, "0.0001"),
            (1e15, "1000000000000000"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0"),
        ] {
            assert_eq!(php_float(f), s, "{f}");
            assert_eq!(parse_float(s.as_bytes()), Some(f));
        }
    }

    #[test]
    fn refuses_non_data() {
        assert_eq!(Value::parse(b"O:8:\"stdClass\":0:{}"), Err(ValueError::Forbidden("object")));
        assert_eq!(Value::parse(b"a:1:{i:0;r:1;}"), Err(ValueError::Forbidden("reference")));
        assert!(matches!(Value::parse(b"s:5:\"abc\";"), Err(ValueError::Truncated(_))));
        assert!(matches!(Value::parse(b"i:1;x"), Err(ValueError::Trailing(1))));
        assert!(matches!(Value::parse(b"a:1:{d:1;i:1;}"), Err(ValueError::Unexpected { .. })));
        assert!(matches!(Value::parse(b"i:99999999999999999999;"), Err(ValueError::BadNumber(_))));
        assert!(matches!(Value::parse(b"a:4000000000:{}"), Err(ValueError::Truncated(_))));
    }

    #[test]
    fn depth_is_limited() {
        let deep = "a:1:{i:0;".repeat(MAX_DEPTH + 1) + "N;" + &"}".repeat(MAX_DEPTH + 1);
        assert_eq!(Value::parse(deep.as_bytes()), Err(ValueError::TooDeep));
        let ok = "a:1:{i:0;".repeat(MAX_DEPTH) + "N;" + &"}".repeat(MAX_DEPTH);
        assert!(Value::parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn php_string_conversion() {
        assert_eq!(Value::Int(-3).to_php_string().unwrap(), b"-3");
        assert_eq!(Value::Bool(true).to_php_string().unwrap(), b"1");
        assert_eq!(Value::Null.to_php_string().unwrap(), b"");
        assert_eq!(Value::list([]).to_php_string(), None);
    }
}
