import SwiftUI

/// A minimal STARFlow app: choose an export folder, type a prompt, generate. Build it from Xcode
/// with the StarFlow package added as a local dependency (see README.md here).
@main
struct StarFlowSampleApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
