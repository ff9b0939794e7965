//! The little of Protocol Buffers the trackers need, by hand: TensorBoard's `Event`/`Summary`
//! and W&B's `Record` are plain messages of varints, fixed-width numbers and nested bytes, so an
//! encoder of ~40 lines and a field reader replace a code generator and its build step.
//!
//! Wire format (protobuf encoding spec): each field is `key = field_number << 3 | wire_type`
//! as a varint, then the value: 0 varint, 1 little-endian 8 bytes, 2 length-delimited
//! (varint length + bytes: strings, bytes, nested messages, packed repeated), 5 little-endian 4
//! bytes.

/// A message being encoded, fields appended in the order written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Msg(pub Vec<u8>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Msg {
    pub fn new() -> Self {
        Msg(Vec::new())
    }

    fn key(&mut self, field: u32, wire: u8) {
        put_varint(&mut self.0, (u64::from(field) << 3) | u64::from(wire));
    }

    /// `int32`/`int64`/`uint64`/enum (negative numbers as 10-byte two's complement, as protobuf does).
    pub fn varint(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        put_varint(&mut self.0, v as u64);
        self
    }

    pub fn boolean(self, field: u32, v: bool) -> Self {
        self.varint(field, i64::from(v))
    }

    pub fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        put_varint(&mut self.0, v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn string(self, field: u32, v: &str) -> Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn msg(self, field: u32, m: &Msg) -> Self {
        self.bytes(field, &m.0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// One decoded field: its number and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Bytes(u32, &'a [u8]),
    Fixed32(u32, u32),
}

impl Field<'_> {
    pub fn number(&self) -> u32 {
        match *self {
            Field::Varint(n, _) | Field::Fixed64(n, _) | Field::Bytes(n, _) | Field::Fixed32(n, _) => n,
        }
    }
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The top-level fields of an encoded message; `None` when the bytes are not a well-formed
/// message (a torn or foreign record).
pub fn fields(buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos)?;
        let n = u32::try_from(key >> 3).ok().filter(|&n| n > 0)?;
        let f = match key & 7 {
            0 => Field::Varint(n, get_varint(buf, &mut pos)?),
            1 => {
                let b: [u8; 8] = buf.get(pos..pos + 8)?.try_into().ok()?;
                pos += 8;
                Field::Fixed64(n, u64::from_le_bytes(b))
            }
            2 => {
                let len = usize::try_from(get_varint(buf, &mut pos)?).ok()?;
                let b = buf.get(pos..pos.checked_add(len)?)?;
                pos += len;
                Field::Bytes(n, b)
            }
            5 => {
                let b: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
                pos += 4;
                Field::Fixed32(n, u32::from_le_bytes(b))
            }
            _ => return None,
        };
        out.push(f);
    }
    Some(out)
}

/// The first varint field `n` of `buf`.
pub fn varint_of(buf: &[u8], n: u32) -> Option<u64> {
    fields(buf)?.into_iter().find_map(|f| match f {
        Field::Varint(m, v) if m == n => Some(v),
        _ => None,
    })
}

/// The first length-delimited field `n` of `buf`.
pub fn bytes_of(buf: &[u8], n: u32) -> Option<&[u8]> {
    fields(buf)?.into_iter().find_map(|f| match f {
        Field::Bytes(m, b) if m == n => Some(b),
        _ => None,
    })
}

/// CRC-32C (Castagnoli), the checksum of TFRecord framing.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: `u64 length, u32 masked_crc(length), data, u32 masked_crc(data)`, little-endian.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The records of a TFRecord file, in order, up to the first torn or corrupt one (a run killed
/// mid-write leaves at most one such tail).
pub fn read_tfrecords(buf: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some(head) = buf.get(pos..pos + 12) {
        let (len_bytes, crc) = head.split_at(8);
        if masked_crc32c(len_bytes).to_le_bytes() != crc {
            break;
        }
        let Ok(len) = usize::try_from(u64::from_le_bytes(len_bytes.try_into().unwrap_or_default())) else { break };
        let Some(data) = pos.checked_add(12).and_then(|s| Some(s..s.checked_add(len)?)).and_then(|r| buf.get(r)) else { break };
        let Some(tail) = buf.get(pos + 12 + len..pos + 16 + len) else { break };
        if masked_crc32c(data).to_le_bytes() != tail {
            break;
        }
        out.push(data);
        pos += 16 + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn varints_and_fields_round_trip() {
        let inner = Msg::new().string(1, "loss").float(2, 1.5);
        let m = Msg::new().double(1, 2.25).varint(2, 300).varint(3, -1).msg(5, &inner);
        // 300 is the protobuf spec's own example: 0xAC 0x02.
        assert_eq!(&m.0[9..12], &[0x10, 0xAC, 0x02]);
        let f = fields(&m.0).unwrap();
        assert_eq!(f[0], Field::Fixed64(1, 2.25f64.to_bits()));
        assert_eq!(f[1], Field::Varint(2, 300));
        assert_eq!(f[2], Field::Varint(3, u64::MAX), "negative int64 is ten bytes of two's complement");
        assert_eq!(bytes_of(&m.0, 5), Some(inner.0.as_slice()));
        assert!(fields(&[0x0a, 0x05, 0x01]).is_none(), "a length past the end is not a message");
    }

    #[test]
    fn tfrecords_stop_at_a_torn_tail() {
        let mut file = tfrecord(b"first");
        file.extend(tfrecord(b"second"));
        let whole = file.len();
        file.extend(&tfrecord(b"third")[..10]);
        assert_eq!(read_tfrecords(&file), vec![b"first".as_slice(), b"second".as_slice()]);
        file.truncate(whole);
        file[whole - 3] ^= 1; // corrupt the second record's data checksum
        assert_eq!(read_tfrecords(&file), vec![b"first".as_slice()]);
    }
}
