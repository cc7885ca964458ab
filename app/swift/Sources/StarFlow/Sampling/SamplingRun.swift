import Foundation

/// Progress bookkeeping and the stop check shared by both inversion loops.
struct SamplingRun {
    let started: Date
    let stageCount: Int
    let tokensTotal: Int
    let progress: ((SampleProgress) -> Bool)?
    private(set) var block = 0
    private(set) var stage = 0
    private(set) var passes = 0

    init(started: Date, stageCount: Int, tokensTotal: Int, progress: ((SampleProgress) -> Bool)?) {
        self.started = started
        self.stageCount = stageCount
        self.tokensTotal = tokensTotal
        self.progress = progress
    }

    mutating func enter(block: Int, stage: Int) {
        self.block = block
        self.stage = stage
        passes = 0
    }

    /// Throws `CancellationError` when the task is cancelled.
    func checkCancellation() throws {
        if Task.isCancelled { throw CancellationError() }
    }

    /// Counts a model pass and reports it; throws `CancellationError` if the caller says stop.
    mutating func pass(tokensDone: Int) throws {
        passes += 1
        let report = SampleProgress(block: block, stage: stage, stageCount: stageCount, tokensDone: tokensDone,
                                    tokensTotal: tokensTotal, passes: passes, elapsed: Date().timeIntervalSince(started))
        if let progress, !progress(report) { throw CancellationError() }
        try checkCancellation()
    }
}
