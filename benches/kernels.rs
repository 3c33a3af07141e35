//! Criterion benchmarks of the convert-and-accumulate kernels, one per level available here.
//! `cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use _core::dtype::Dtype;
use _core::kernels::{accumulate, finish, Level};

fn bench(c: &mut Criterion) {
    let n = 1 << 16; // one engine chunk
    let src: Vec<u8> = (0..n * 4).map(|i| (i * 7 % 251) as u8 & 0x3B).collect();
    let mut g = c.benchmark_group("accumulate");
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let bytes = &src[..n * dtype.size()];
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        for level in Level::available() {
            g.bench_with_input(BenchmarkId::new(format!("{dtype}"), level.name()), &level, |b, &level| {
                let mut acc = vec![0f32; n];
                b.iter(|| accumulate(level, &mut acc, bytes, dtype, None));
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("finish_f16");
    g.throughput(Throughput::Elements(n as u64));
    for level in Level::available() {
        g.bench_with_input(BenchmarkId::from_parameter(level.name()), &level, |b, &level| {
            let mut acc = vec![1.5f32; n];
            let mut out = vec![0u8; n * 2];
            b.iter(|| finish(level, &mut acc, Some(4.0), &mut out, Dtype::F16));
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
