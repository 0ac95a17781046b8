//! Fuzz the PHP `serialize()` parser: no panic, no unbounded recursion or allocation, and every
//! accepted value re-encodes to something that parses back to the same value.
#![no_main]

use channel_proto::Value;
use libfuzzer_sys::fuzz_target;

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = channel_proto::value::array_spans(data);
    if let Ok(v) = Value::parse(data) {
        let again = Value::parse(&v.encode()).expect("own encoding parses");
        assert!(same(&v, &again), "{v:?} != {again:?}");
    }
});
