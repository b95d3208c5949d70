"""Tools around the node and the library, nothing else imports them: benchmarks (bench,
bench_models, bench_sam2, bench_node), the synthetic camera, recorder and bag replayer (these
import rclpy), synthetic camera bags (synth_bag) and the demo's scorer (demo)."""
