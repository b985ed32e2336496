//! A JPEG decoder that reproduces libjpeg-turbo's default output (what
//! Pillow, and so transformers, open_clip and LAION's code, see), so JPEG
//! inputs get the same pixels and scores as the references.
//!
//! References: ITU T.81 (JPEG; baseline, extended sequential and progressive
//! Huffman coding), and libjpeg-turbo's default decompression path, whose
//! arithmetic is reproduced exactly: the accurate integer inverse DCT
//! (`jidctint.c`, 13-bit constants, two passes with `PASS1_BITS = 2`),
//! "fancy" triangular chroma upsampling for 2x1, 1x2 and 2x2 subsampling
//! (`jdsample.c`, with its alternating rounding biases and edge rows
//! replicated), integer replication for other ratios, and the 16-bit
//! fixed-point YCbCr -> RGB tables of `jdcolor.c`. Colour space selection
//! follows `jdapimin.c` (JFIF, Adobe APP14 transform, component ids).
//! Four-component images are returned as stored CMYK (Adobe convention,
//! inverted), YCCK converted to CMYK first.
//!
//! Not supported (a clear error): arithmetic coding, lossless and
//! hierarchical JPEG, 12-bit samples. A file that ends before its last
//! scan is complete is an error, as Pillow's "image file is truncated".

/// A decoded JPEG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JpegImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The samples, interleaved, row-major.
    pub pixels: JpegPixels,
}

/// The samples of a [`JpegImage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JpegPixels {
    /// One channel.
    Grey(Vec<u8>),
    /// R, G, B.
    Rgb(Vec<u8>),
    /// C, M, Y, K as stored (Adobe files store them inverted).
    Cmyk(Vec<u8>),
}

const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

#[derive(Clone, Debug, Default)]
struct Huffman {
    /// Fast lookup on the next 9 bits: (length, value), length 0 = slow path.
    fast: Vec<(u8, u8)>,
    maxcode: [i32; 18],
    valoffset: [i32; 18],
    values: Vec<u8>,
}

const FAST_BITS: u32 = 9;

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<Self, String> {
        let mut h = Huffman {
            fast: vec![(0, 0); 1 << FAST_BITS],
            maxcode: [-1; 18],
            valoffset: [0; 18],
            values,
        };
        let mut code: i32 = 0;
        let mut k: usize = 0;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            h.valoffset[len] = k as i32 - code;
            for _ in 0..n {
                if k >= h.values.len() {
                    return Err("Huffman table lists more codes than values".into());
                }
                if len <= FAST_BITS as usize {
                    let shift = FAST_BITS as usize - len;
                    let base = (code as usize) << shift;
                    for j in 0..(1usize << shift) {
                        if let Some(slot) = h.fast.get_mut(base + j) {
                            *slot = (len as u8, h.values[k]);
                        }
                    }
                }
                code += 1;
                k += 1;
            }
            h.maxcode[len] = if n > 0 { code - 1 } else { -1 };
            if code > (1 << len) {
                return Err("invalid Huffman table (code space overflow)".into());
            }
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        Ok(h)
    }
}

/// Entropy-coded data reader: byte stuffing, markers, and zero bits past the
/// end (as libjpeg inserts), remembering whether real data ran out.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    marker: Option<u8>,
    fake_bytes: usize,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            nbits: 0,
            marker: None,
            fake_bytes: 0,
        }
    }

    fn fill(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if self.marker.is_none() {
                if self.pos >= self.data.len() {
                    self.fake_bytes += 1;
                } else {
                    let b = self.data[self.pos];
                    if b == 0xFF {
                        let mut next = self.pos + 1;
                        // Fill bytes (0xFF 0xFF ...) may precede a marker.
                        while next < self.data.len() && self.data[next] == 0xFF {
                            next += 1;
                        }
                        match self.data.get(next) {
                            Some(0) => {
                                byte = 0xFF;
                                self.pos = next + 1;
                            }
                            Some(&m) => {
                                self.marker = Some(m);
                                self.pos = next - 1;
                            }
                            None => {
                                self.pos = self.data.len();
                                self.fake_bytes += 1;
                            }
                        }
                    } else {
                        byte = b;
                        self.pos += 1;
                    }
                }
            }
            self.acc |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    #[inline]
    fn peek(&mut self, n: u32) -> u32 {
        if self.nbits < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
    }

    #[inline]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) == 1
    }

    /// `RECEIVE` + `EXTEND` of T.81 F.2.2.1.
    #[inline]
    fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let v = self.bits(s) as i32;
        if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        }
    }

    fn decode(&mut self, h: &Huffman) -> Result<u8, String> {
        let look = self.peek(FAST_BITS) as usize;
        let (len, val) = h.fast[look];
        if len > 0 {
            self.consume(u32::from(len));
            return Ok(val);
        }
        let all = self.peek(16) as i32;
        for len in (FAST_BITS as usize + 1)..=16 {
            let code = all >> (16 - len);
            if code <= h.maxcode[len] {
                self.consume(len as u32);
                let idx = (code + h.valoffset[len]) as usize;
                return h
                    .values
                    .get(idx)
                    .copied()
                    .ok_or_else(|| "corrupt Huffman data".to_string());
            }
        }
        Err("corrupt JPEG data: bad Huffman code".into())
    }

    /// Whether bits past the real end of the data were consumed.
    fn overran(&self) -> bool {
        self.fake_bytes * 8 > self.nbits as usize
    }

    /// Discards buffered bits and moves past the next RSTn marker.
    fn restart(&mut self) {
        self.acc = 0;
        self.nbits = 0;
        if self.marker.is_none() {
            // Scan forward for a marker (libjpeg resyncs the same way).
            while self.pos + 1 < self.data.len()
                && !(self.data[self.pos] == 0xFF
                    && self.data[self.pos + 1] != 0
                    && self.data[self.pos + 1] != 0xFF)
            {
                self.pos += 1;
            }
            if self.pos + 1 < self.data.len() {
                self.marker = Some(self.data[self.pos + 1]);
            }
        }
        if let Some(m) = self.marker {
            if (0xD0..=0xD7).contains(&m) {
                self.pos += 2;
                self.marker = None;
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks per row / column allocated (whole MCUs).
    bw: usize,
    bh: usize,
    /// Coefficients in natural order, `bw * bh` blocks.
    coefs: Vec<[i32; 64]>,
    dc_pred: i32,
    dc_table: usize,
    ac_table: usize,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
}

fn be16(d: &[u8], at: usize) -> Result<usize, String> {
    match d.get(at..at + 2) {
        Some(b) => Ok(usize::from(b[0]) << 8 | usize::from(b[1])),
        None => Err("truncated JPEG header".into()),
    }
}

/// Decodes a JPEG file held in memory.
pub fn decode_jpeg(data: &[u8]) -> Result<JpegImage, String> {
    decode_jpeg_limited(data, u64::MAX)
}

/// [`decode_jpeg`], refusing a frame of more than `max_pixels` pixels as
/// soon as its header is read, before any pixel memory is allocated (a few
/// bytes of header can otherwise ask for gigabytes).
pub fn decode_jpeg_limited(data: &[u8], max_pixels: u64) -> Result<JpegImage, String> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err("not a JPEG file (no SOI marker)".into());
    }
    let mut pos = 2;
    let mut qt = [[0i32; 64]; 4];
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0usize;
    let mut saw_jfif = false;
    let mut adobe: Option<u8> = None;
    let mut scans = 0usize;
    let mut eoi = false;
    while pos < data.len() {
        if data[pos] != 0xFF {
            pos += 1; // garbage between markers: libjpeg skips it with a warning
            continue;
        }
        let marker = match data.get(pos + 1) {
            Some(&m) => m,
            None => break,
        };
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        pos += 2;
        match marker {
            0xD8 | 0x01 | 0xD0..=0xD7 => continue,
            0xD9 => {
                eoi = true;
                break;
            }
            _ => {}
        }
        let len = be16(data, pos)?;
        if len < 2 || pos + len > data.len() {
            return Err("truncated JPEG: a marker segment runs past the end of the file".into());
        }
        let seg = &data[pos + 2..pos + len];
        match marker {
            0xDB => {
                let mut i = 0;
                while i < seg.len() {
                    let pq = seg[i] >> 4;
                    let tq = usize::from(seg[i] & 15);
                    if tq > 3 {
                        return Err("bad quantisation table id".into());
                    }
                    i += 1;
                    for k in 0..64 {
                        let v = if pq == 0 {
                            i32::from(*seg.get(i + k).ok_or("truncated DQT")?)
                        } else {
                            be16(seg, i + 2 * k).map_err(|_| "truncated DQT")? as i32
                        };
                        qt[tq][ZIGZAG[k]] = v;
                    }
                    i += if pq == 0 { 64 } else { 128 };
                }
            }
            0xC4 => {
                let mut i = 0;
                while i < seg.len() {
                    let tc = seg[i] >> 4;
                    let th = usize::from(seg[i] & 15);
                    if th > 3 || tc > 1 {
                        return Err("bad Huffman table id".into());
                    }
                    let counts: [u8; 16] = seg
                        .get(i + 1..i + 17)
                        .ok_or("truncated DHT")?
                        .try_into()
                        .map_err(|_| "truncated DHT")?;
                    let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let values = seg.get(i + 17..i + 17 + n).ok_or("truncated DHT")?.to_vec();
                    let table = Huffman::new(&counts, values)?;
                    if tc == 0 {
                        dc[th] = Some(table);
                    } else {
                        ac[th] = Some(table);
                    }
                    i += 17 + n;
                }
            }
            0xDD => restart_interval = be16(seg, 0)?,
            0xE0 => saw_jfif |= seg.starts_with(b"JFIF\0"),
            0xEE if seg.len() >= 12 && seg.starts_with(b"Adobe") => adobe = Some(seg[11]),
            0xC0..=0xC2 => {
                if frame.is_some() {
                    return Err("JPEG has several frames".into());
                }
                frame = Some(parse_frame(seg, marker == 0xC2, max_pixels)?);
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(format!(
                    "unsupported JPEG coding (SOF{}: lossless, hierarchical or arithmetic); convert the image to PNG",
                    marker - 0xC0
                ))
            }
            0xDA => {
                let f = frame.as_mut().ok_or("JPEG scan before its frame header")?;
                let end = decode_scan(f, seg, data, pos + len, &qt, &dc, &ac, restart_interval)?;
                scans += 1;
                pos = end;
                continue;
            }
            _ => {}
        }
        pos += len;
    }
    let f = frame.ok_or("JPEG has no frame header")?;
    if scans == 0 {
        return Err("truncated JPEG: no image data".into());
    }
    if !eoi {
        // libjpeg would make up an end-of-image marker; Pillow asks for more
        // data and reports the file as truncated.
        return Err("truncated JPEG: the file ends before its end-of-image marker".into());
    }
    finish(f, &qt, saw_jfif, adobe)
}

fn parse_frame(seg: &[u8], progressive: bool, max_pixels: u64) -> Result<Frame, String> {
    if seg.len() < 6 {
        return Err("truncated frame header".into());
    }
    if seg[0] != 8 {
        return Err(format!("{}-bit JPEG samples are not supported", seg[0]));
    }
    let height = be16(seg, 1)?;
    let width = be16(seg, 3)?;
    let n = usize::from(seg[5]);
    if width == 0 || height == 0 {
        return Err("JPEG with zero width or height (DNL) is not supported".into());
    }
    if (width as u64) * (height as u64) > max_pixels {
        return Err(format!(
            "{width}x{height} is more than the {max_pixels} pixels allowed (decompression bomb guard)"
        ));
    }
    if !matches!(n, 1 | 3 | 4) {
        return Err(format!("{n}-component JPEGs are not supported"));
    }
    let mut comps = Vec::with_capacity(n);
    for i in 0..n {
        let c = seg
            .get(6 + 3 * i..9 + 3 * i)
            .ok_or("truncated frame header")?;
        let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
            return Err("bad JPEG sampling factors".into());
        }
        comps.push(Component {
            id: c[0],
            h,
            v,
            tq: usize::from(c[2]),
            bw: 0,
            bh: 0,
            coefs: Vec::new(),
            dc_pred: 0,
            dc_table: 0,
            ac_table: 0,
        });
    }
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    let mcux = width.div_ceil(8 * hmax);
    let mcuy = height.div_ceil(8 * vmax);
    for c in &mut comps {
        c.bw = mcux * c.h;
        c.bh = mcuy * c.v;
        if c.bw * c.bh > 1 << 26 {
            return Err("JPEG too large".into());
        }
        c.coefs = vec![[0; 64]; c.bw * c.bh];
    }
    Ok(Frame {
        width,
        height,
        progressive,
        comps,
        hmax,
        vmax,
        mcux,
        mcuy,
    })
}

#[allow(clippy::too_many_arguments)]
fn decode_scan(
    f: &mut Frame,
    header: &[u8],
    data: &[u8],
    start: usize,
    _qt: &[[i32; 64]; 4],
    dc: &[Option<Huffman>; 4],
    ac: &[Option<Huffman>; 4],
    restart_interval: usize,
) -> Result<usize, String> {
    let ns = usize::from(*header.first().ok_or("truncated scan header")?);
    let mut members = Vec::with_capacity(ns);
    for i in 0..ns {
        let id = *header.get(1 + 2 * i).ok_or("truncated scan header")?;
        let t = *header.get(2 + 2 * i).ok_or("truncated scan header")?;
        let ci = f
            .comps
            .iter()
            .position(|c| c.id == id)
            .ok_or("scan names an unknown component")?;
        f.comps[ci].dc_table = usize::from(t >> 4 & 3);
        f.comps[ci].ac_table = usize::from(t & 3);
        members.push(ci);
    }
    let p = 1 + 2 * ns;
    let (ss, se) = (
        usize::from(*header.get(p).ok_or("truncated scan header")?),
        usize::from(*header.get(p + 1).ok_or("truncated scan header")?),
    );
    let a = *header.get(p + 2).ok_or("truncated scan header")?;
    let (ah, al) = (u32::from(a >> 4), u32::from(a & 15));
    if !f.progressive && (ss != 0 || se != 63 || a != 0) || se > 63 || ss > se {
        return Err("invalid spectral selection in a JPEG scan".into());
    }
    for c in &mut f.comps {
        c.dc_pred = 0;
    }
    let mut bits = Bits::new(data, start);
    let mut eobrun = 0u32;
    let single = members.len() == 1;
    let (units_x, units_y) = if single {
        let c = &f.comps[members[0]];
        (
            (f.width * c.h).div_ceil(f.hmax).div_ceil(8),
            (f.height * c.v).div_ceil(f.vmax).div_ceil(8),
        )
    } else {
        (f.mcux, f.mcuy)
    };
    let total = units_x * units_y;
    for unit in 0..total {
        if restart_interval > 0 && unit > 0 && unit % restart_interval == 0 {
            bits.restart();
            eobrun = 0;
            for c in &mut f.comps {
                c.dc_pred = 0;
            }
        }
        let (ux, uy) = (unit % units_x, unit / units_x);
        for &ci in &members {
            let (h, v) = if single {
                (1, 1)
            } else {
                (f.comps[ci].h, f.comps[ci].v)
            };
            for by in 0..v {
                for bx in 0..h {
                    let c = &mut f.comps[ci];
                    let (x, y) = (ux * h + bx, uy * v + by);
                    let idx = y * c.bw + x;
                    let mut pred = c.dc_pred;
                    let block = &mut c.coefs[idx];
                    if !f.progressive {
                        decode_baseline(
                            &mut bits,
                            block,
                            &mut pred,
                            table(dc, c.dc_table)?,
                            table(ac, c.ac_table)?,
                        )?;
                    } else if ss == 0 {
                        if ah == 0 {
                            pred = pred.wrapping_add(dc_diff(&mut bits, table(dc, c.dc_table)?)?);
                            block[0] = pred.wrapping_shl(al);
                        } else if bits.bit() {
                            block[0] |= 1 << al;
                        }
                    } else if ah == 0 {
                        ac_first(
                            &mut bits,
                            block,
                            ss,
                            se,
                            al,
                            &mut eobrun,
                            table(ac, c.ac_table)?,
                        )?;
                    } else {
                        ac_refine(
                            &mut bits,
                            block,
                            ss,
                            se,
                            al,
                            &mut eobrun,
                            table(ac, c.ac_table)?,
                        )?;
                    }
                    c.dc_pred = pred;
                }
            }
        }
        if bits.overran() {
            return Err(
                "truncated JPEG: the image data ends early (Pillow: image file is truncated)"
                    .into(),
            );
        }
    }
    // Continue after the scan's data: at the marker that ended it.
    let mut end = bits.pos;
    if bits.marker.is_none() {
        while end + 1 < data.len()
            && !(data[end] == 0xFF && data[end + 1] != 0 && !(0xD0..=0xD7).contains(&data[end + 1]))
        {
            end += 1;
        }
    }
    Ok(end)
}

fn table(t: &[Option<Huffman>; 4], i: usize) -> Result<&Huffman, String> {
    t[i].as_ref()
        .ok_or_else(|| "JPEG scan uses an undefined Huffman table".to_string())
}

/// A DC difference: its category, then that many bits (T.81 F.2.2.1).
/// Categories above 15 cannot be coded; libjpeg-turbo refuses such a DC
/// table (`JERR_BAD_HUFF_TABLE`), and reading more than 32 bits would
/// overflow.
fn dc_diff(bits: &mut Bits, dc: &Huffman) -> Result<i32, String> {
    let t = u32::from(bits.decode(dc)?);
    if t > 15 {
        return Err(format!("bad Huffman table: DC category {t} (at most 15)"));
    }
    Ok(bits.receive_extend(t))
}

fn decode_baseline(
    bits: &mut Bits,
    block: &mut [i32; 64],
    pred: &mut i32,
    dc: &Huffman,
    ac: &Huffman,
) -> Result<(), String> {
    *pred = pred.wrapping_add(dc_diff(bits, dc)?);
    block[0] = *pred;
    let mut k = 1;
    while k < 64 {
        let rs = bits.decode(ac)?;
        let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += r;
            if k > 63 {
                break;
            }
            block[ZIGZAG[k]] = bits.receive_extend(s);
            k += 1;
        } else if r == 15 {
            k += 16;
        } else {
            break;
        }
    }
    Ok(())
}

fn ac_first(
    bits: &mut Bits,
    block: &mut [i32; 64],
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
    ac: &Huffman,
) -> Result<(), String> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = bits.decode(ac)?;
        let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
        if s != 0 {
            k += r as usize;
            if k > 63 {
                break;
            }
            block[ZIGZAG[k]] = bits.receive_extend(s) * (1 << al);
            k += 1;
        } else if r == 15 {
            k += 16;
        } else {
            *eobrun = (1 << r) - 1;
            if r > 0 {
                *eobrun += bits.bits(r);
            }
            break;
        }
    }
    Ok(())
}

fn ac_refine(
    bits: &mut Bits,
    block: &mut [i32; 64],
    ss: usize,
    se: usize,
    al: u32,
    eobrun: &mut u32,
    ac: &Huffman,
) -> Result<(), String> {
    let p1: i32 = 1 << al;
    let m1: i32 = -1 << al;
    let mut k = ss;
    let refine = |bits: &mut Bits, coef: &mut i32| {
        if bits.bit() && (*coef & p1) == 0 {
            if *coef >= 0 {
                *coef += p1;
            } else {
                *coef += m1;
            }
        }
    };
    if *eobrun == 0 {
        while k <= se {
            let rs = bits.decode(ac)?;
            let mut r = i32::from(rs >> 4);
            let s = rs & 15;
            let mut value = 0;
            if s != 0 {
                value = if bits.bit() { p1 } else { m1 };
            } else if r != 15 {
                *eobrun = 1 << r;
                if r > 0 {
                    *eobrun += bits.bits(r as u32);
                }
                break;
            }
            while k <= se {
                let z = ZIGZAG[k];
                if block[z] != 0 {
                    refine(bits, &mut block[z]);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 && k <= 63 {
                block[ZIGZAG[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= se {
            let z = ZIGZAG[k];
            if block[z] != 0 {
                refine(bits, &mut block[z]);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

/// libjpeg's `jpeg_idct_islow` on a dequantised block, into `out` (8x8 at
/// `stride`), clamping like the SIMD implementations.
fn idct_islow(coef: &[i32; 64], q: &[i32; 64], out: &mut [u8], stride: usize) {
    const CONST_BITS: i32 = 13;
    const PASS1_BITS: i32 = 2;
    const F0_298: i64 = 2446;
    const F0_390: i64 = 3196;
    const F0_541: i64 = 4433;
    const F0_765: i64 = 6270;
    const F0_899: i64 = 7373;
    const F1_175: i64 = 9633;
    const F1_501: i64 = 12299;
    const F1_847: i64 = 15137;
    const F1_961: i64 = 16069;
    const F2_053: i64 = 16819;
    const F2_562: i64 = 20995;
    const F3_072: i64 = 25172;
    #[inline]
    fn descale(x: i64, n: i32) -> i64 {
        (x + (1 << (n - 1))) >> n
    }
    // Returns (tmp10..tmp13, tmp0..tmp3) of the even/odd parts.
    #[inline]
    fn butterfly(i: [i64; 8], even_shift: i32) -> [i64; 8] {
        let (z2, z3) = (i[2], i[6]);
        let z1 = (z2 + z3) * F0_541;
        let tmp2 = z1 + z3 * -F1_847;
        let tmp3 = z1 + z2 * F0_765;
        let tmp0 = (i[0] + i[4]) << even_shift;
        let tmp1 = (i[0] - i[4]) << even_shift;
        let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (mut t0, mut t1, mut t2, mut t3) = (i[7], i[5], i[3], i[1]);
        let z1 = t0 + t3;
        let z2 = t1 + t2;
        let z3 = t0 + t2;
        let z4 = t1 + t3;
        let z5 = (z3 + z4) * F1_175;
        t0 *= F0_298;
        t1 *= F2_053;
        t2 *= F3_072;
        t3 *= F1_501;
        let z1 = z1 * -F0_899;
        let z2 = z2 * -F2_562;
        let z3 = z3 * -F1_961 + z5;
        let z4 = z4 * -F0_390 + z5;
        t0 += z1 + z3;
        t1 += z2 + z4;
        t2 += z2 + z3;
        t3 += z1 + z4;
        [
            tmp10 + t3,
            tmp11 + t2,
            tmp12 + t1,
            tmp13 + t0,
            tmp13 - t0,
            tmp12 - t1,
            tmp11 - t2,
            tmp10 - t3,
        ]
    }
    let mut ws = [0i64; 64];
    for col in 0..8 {
        let mut i = [0i64; 8];
        for (r, v) in i.iter_mut().enumerate() {
            *v = i64::from(coef[r * 8 + col]) * i64::from(q[r * 8 + col]);
        }
        let o = butterfly(i, CONST_BITS);
        for (r, v) in o.iter().enumerate() {
            ws[r * 8 + col] = descale(*v, CONST_BITS - PASS1_BITS);
        }
    }
    for row in 0..8 {
        let mut i = [0i64; 8];
        i.copy_from_slice(&ws[row * 8..row * 8 + 8]);
        let o = butterfly(i, CONST_BITS);
        for (c, v) in o.iter().enumerate() {
            let s = descale(*v, CONST_BITS + PASS1_BITS + 3) + 128;
            out[row * stride + c] = s.clamp(0, 255) as u8;
        }
    }
}

/// Sample plane of one component after the IDCT.
struct Plane {
    data: Vec<u8>,
    stride: usize,
    /// `downsampled_width` / `_height`: the component's real samples.
    w: usize,
    h: usize,
}

fn component_plane(f: &Frame, c: &Component, q: &[i32; 64]) -> Plane {
    let stride = c.bw * 8;
    let mut data = vec![0u8; stride * c.bh * 8];
    for by in 0..c.bh {
        for bx in 0..c.bw {
            let off = by * 8 * stride + bx * 8;
            idct_islow(&c.coefs[by * c.bw + bx], q, &mut data[off..], stride);
        }
    }
    Plane {
        data,
        stride,
        w: (f.width * c.h).div_ceil(f.hmax),
        h: (f.height * c.v).div_ceil(f.vmax),
    }
}

/// Upsamples a component to full size (`width x height`), as libjpeg-turbo's
/// default ("fancy") upsampler does.
fn upsample(p: &Plane, hx: usize, vx: usize, width: usize, height: usize) -> Vec<u8> {
    let mut out = vec![0u8; width * height];
    let at = |x: usize, y: usize| i32::from(p.data[y * p.stride + x]);
    let last_row = p.h.max(1) - 1;
    match (hx, vx) {
        (1, 1) => {
            for y in 0..height {
                out[y * width..(y + 1) * width]
                    .copy_from_slice(&p.data[y * p.stride..y * p.stride + width]);
            }
        }
        (2, 1) if p.w > 2 => {
            for y in 0..height {
                let row = h2v1_row(|x| at(x, y), p.w);
                out[y * width..(y + 1) * width].copy_from_slice(&row[..width]);
            }
        }
        (1, 2) => {
            for y in 0..height {
                let (r, v) = (y / 2, y % 2);
                let (near, bias) = if v == 0 {
                    (r.saturating_sub(1), 1)
                } else {
                    ((r + 1).min(last_row), 2)
                };
                for x in 0..width {
                    out[y * width + x] = ((at(x, r) * 3 + at(x, near) + bias) >> 2) as u8;
                }
            }
        }
        (2, 2) if p.w > 2 => {
            for y in 0..height {
                let (r, v) = (y / 2, y % 2);
                let near = if v == 0 {
                    r.saturating_sub(1)
                } else {
                    (r + 1).min(last_row)
                };
                let colsum = |x: usize| at(x, r) * 3 + at(x, near);
                let w = p.w;
                let o = &mut out[y * width..(y + 1) * width];
                let mut put = |i: usize, v: i32| {
                    if i < width {
                        o[i] = v as u8;
                    }
                };
                let mut this = colsum(0);
                let mut next = colsum(1);
                put(0, (this * 4 + 8) >> 4);
                put(1, (this * 3 + next + 7) >> 4);
                let mut last = this;
                this = next;
                for x in 1..w - 1 {
                    next = colsum(x + 1);
                    put(2 * x, (this * 3 + last + 8) >> 4);
                    put(2 * x + 1, (this * 3 + next + 7) >> 4);
                    last = this;
                    this = next;
                }
                put(2 * (w - 1), (this * 3 + last + 8) >> 4);
                put(2 * (w - 1) + 1, (this * 4 + 7) >> 4);
            }
        }
        _ => {
            // Integer replication (libjpeg's h2v1/h2v2/int upsample).
            for y in 0..height {
                for x in 0..width {
                    out[y * width + x] = p.data[(y / vx) * p.stride + x / hx];
                }
            }
        }
    }
    out
}

fn h2v1_row(at: impl Fn(usize) -> i32, w: usize) -> Vec<u8> {
    let mut o = vec![0u8; 2 * w];
    let first = at(0);
    o[0] = first as u8;
    o[1] = ((first * 3 + at(1) + 2) >> 2) as u8;
    for x in 1..w - 1 {
        let v = at(x) * 3;
        o[2 * x] = ((v + at(x - 1) + 1) >> 2) as u8;
        o[2 * x + 1] = ((v + at(x + 1) + 2) >> 2) as u8;
    }
    let last = at(w - 1);
    o[2 * (w - 1)] = ((last * 3 + at(w - 2) + 1) >> 2) as u8;
    o[2 * (w - 1) + 1] = last as u8;
    o
}

/// libjpeg's YCbCr -> RGB tables (`jdcolor.c`, 16-bit fixed point).
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

impl YccTables {
    fn new() -> Self {
        const SCALEBITS: i64 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * (1i64 << SCALEBITS) as f64 + 0.5) as i64;
        let mut t = Self {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        t
    }

    #[inline]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        let y = i32::from(y);
        let (cb, cr) = (usize::from(cb), usize::from(cr));
        let g = ((self.cb_g[cb] + self.cr_g[cr]) >> 16) as i32;
        [
            (y + self.cr_r[cr]).clamp(0, 255) as u8,
            (y + g).clamp(0, 255) as u8,
            (y + self.cb_b[cb]).clamp(0, 255) as u8,
        ]
    }
}

fn finish(
    f: Frame,
    qt: &[[i32; 64]; 4],
    saw_jfif: bool,
    adobe: Option<u8>,
) -> Result<JpegImage, String> {
    let (w, h) = (f.width, f.height);
    let mut planes = Vec::with_capacity(f.comps.len());
    for c in &f.comps {
        if f.hmax % c.h != 0 || f.vmax % c.v != 0 {
            return Err("fractional JPEG sampling factors are not supported".into());
        }
        let p = component_plane(&f, c, &qt[c.tq]);
        planes.push(upsample(&p, f.hmax / c.h, f.vmax / c.v, w, h));
    }
    let n = w * h;
    let pixels = match planes.len() {
        1 => JpegPixels::Grey(planes.swap_remove(0)),
        3 => {
            let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
            let ycc = if saw_jfif {
                true
            } else if let Some(t) = adobe {
                t != 0
            } else {
                ids != [b'R', b'G', b'B']
            };
            let mut out = vec![0u8; 3 * n];
            if ycc {
                let t = YccTables::new();
                for i in 0..n {
                    out[3 * i..3 * i + 3].copy_from_slice(&t.rgb(
                        planes[0][i],
                        planes[1][i],
                        planes[2][i],
                    ));
                }
            } else {
                for i in 0..n {
                    for c in 0..3 {
                        out[3 * i + c] = planes[c][i];
                    }
                }
            }
            JpegPixels::Rgb(out)
        }
        _ => {
            let ycck = adobe.is_some_and(|t| t != 0);
            let t = YccTables::new();
            let mut out = vec![0u8; 4 * n];
            for i in 0..n {
                if ycck {
                    let rgb = t.rgb(planes[0][i], planes[1][i], planes[2][i]);
                    for c in 0..3 {
                        out[4 * i + c] = 255 - rgb[c];
                    }
                } else {
                    for c in 0..3 {
                        out[4 * i + c] = planes[c][i];
                    }
                }
                out[4 * i + 3] = planes[3][i];
            }
            JpegPixels::Cmyk(out)
        }
    };
    Ok(JpegImage {
        width: w,
        height: h,
        pixels,
    })
}
