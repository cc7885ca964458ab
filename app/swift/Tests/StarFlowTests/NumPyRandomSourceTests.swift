import Testing
@testable import StarFlow

/// Every expected value below was printed by NumPy 2.4.6 itself in this project's virtual
/// environment, e.g. `.venv/bin/python -c "import numpy as np;
/// print(repr(np.random.RandomState(42).standard_normal(8)))"`.
struct NumPyRandomSourceTests {
    @Test func rawOutputsMatchMT19937() {
        // np.random.RandomState(1234).randint(0, 2**32, size=3, dtype=np.uint64)
        var source = NumPyRandomSource(seed: 1234)
        #expect((0..<3).map { _ in source.nextUInt32() } == [822_569_775, 2_137_449_171, 2_671_936_806])
    }

    @Test func doublesMatchRandomSample() {
        // np.random.RandomState(42).random_sample(3) -> [0.37454012, 0.95071431, 0.73199394]
        var source = NumPyRandomSource(seed: 42)
        let values = (0..<3).map { _ in source.nextDouble() }
        for (value, expected) in zip(values, [0.37454012, 0.95071431, 0.73199394]) {
            #expect(abs(value - expected) < 5e-9)
        }
    }

    @Test func gaussiansMatchStandardNormalExactly() {
        // np.random.RandomState(42).standard_normal(8), printed with 17 significant digits
        let expected = [
            0.4967141530112327, -0.13826430117118466, 0.6476885381006925, 1.5230298564080254,
            -0.23415337472333597, -0.23413695694918055, 1.5792128155073915, 0.7674347291529088,
        ]
        var source = NumPyRandomSource(seed: 42)
        #expect((0..<8).map { _ in source.nextGaussian() } == expected)
    }

    @Test func largestSeedIsAccepted() {
        // np.random.RandomState(4294967295).standard_normal(3)
        var source = NumPyRandomSource(seed: 4_294_967_295)
        #expect((0..<3).map { _ in source.nextGaussian() } == [0.6484086742306527, 0.6693235306338161, -1.0805437227474493])
    }

    @Test func noiseIsTheFloat32CastInCOrder() {
        // x = np.random.RandomState(3).standard_normal((1,4,32,32)).astype(np.float32).ravel()
        // [str(v) for v in x[[0, 1, 2, 4093, 4094, 4095]]]  (shortest round-trip strings)
        let noise = NumPyRandomSource.noise(seed: 3, shape: [1, 4, 32, 32])
        let picked = [0, 1, 2, 4093, 4094, 4095].map { noise.values[$0] }
        #expect(picked == [1.7886285, 0.43650985, 0.09649747, 1.0418497, -0.023971435, 2.130309] as [Float])
    }
}
