/// Which processors Core ML may use. `.cpuAndGPU` is the default: stateful transformer exports
/// were reported to give wrong results on the Neural Engine (see the README).
public enum ComputeUnits: String, CaseIterable, Sendable {
    case all
    case cpuAndGPU
    case cpuAndNeuralEngine
    case cpuOnly
}
