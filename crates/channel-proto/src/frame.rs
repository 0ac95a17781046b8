//! Length-prefixed frames: `u32be(total length including these 4 bytes)` then the payload.
//!
//! A frame whose payload is empty is a ping. [`check`] tells whether a buffer holds a whole frame
//! before anything is parsed, and refuses headers that are impossible or above the size limit.

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the length header.
pub const HEADER_LEN: usize = 4;
/// Default largest frame accepted (header included): 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// A frame header that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is below the 4-byte header it must include")]
    TooSmall(u32),
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
}

/// Look at the start of `buf`: `Ok(Some(n))` when a whole frame of `n` bytes (header included) is
/// there, `Ok(None)` when more bytes are needed, an error when the header is unacceptable.
pub fn check(buf: &[u8], max_frame: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if (len as usize) < HEADER_LEN {
        return Err(FrameError::TooSmall(len));
    }
    if len as u64 > max_frame as u64 {
        return Err(FrameError::TooLarge { len: len.into(), max: max_frame });
    }
    let len = len as usize;
    Ok((buf.len() >= len).then_some(len))
}

/// Take one whole frame's payload off the front of `buf`, if there is one.
pub fn take_payload(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, FrameError> {
    match check(buf, max_frame)? {
        Some(n) => {
            let mut frame = buf.split_to(n).freeze();
            Ok(Some(frame.split_off(HEADER_LEN)))
        }
        None => Ok(None),
    }
}

/// Append a frame holding `payload` to `out`.
pub fn encode_into(payload: &[u8], out: &mut BytesMut) {
    out.reserve(HEADER_LEN + payload.len());
    out.put_u32((payload.len() + HEADER_LEN) as u32);
    out.put_slice(payload);
}

/// A whole frame holding `payload`.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    encode_into(payload, &mut out);
    out.freeze()
}

/// The ping frame: an empty payload.
pub const PING: [u8; 4] = [0, 0, 0, 4];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_and_whole() {
        let f = encode(b"abc");
        assert_eq!(&f[..], b"\0\0\0\x07abc");
        assert_eq!(check(&f[..3], 100), Ok(None));
        assert_eq!(check(&f[..6], 100), Ok(None));
        assert_eq!(check(&f, 100), Ok(Some(7)));
        assert_eq!(check(&PING, 100), Ok(Some(4)));
    }

    #[test]
    fn bad_headers() {
        assert_eq!(check(&[0, 0, 0, 3], 100), Err(FrameError::TooSmall(3)));
        assert!(matches!(check(&[0, 0, 1, 0], 100), Err(FrameError::TooLarge { len: 256, .. })));
        assert!(matches!(check(&[255, 255, 255, 255], 100), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn take_leaves_the_rest() {
        let mut buf = BytesMut::new();
        encode_into(b"one", &mut buf);
        encode_into(b"", &mut buf);
        buf.extend_from_slice(&[0, 0]);
        assert_eq!(take_payload(&mut buf, 100).unwrap().unwrap(), &b"one"[..]);
        assert_eq!(take_payload(&mut buf, 100).unwrap().unwrap(), &b""[..]);
        assert_eq!(take_payload(&mut buf, 100).unwrap(), None);
        assert_eq!(buf.len(), 2);
    }
}
