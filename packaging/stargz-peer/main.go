// Command containerd-stargz-grpc serves stargz-snapshotter (Debian's Go library,
// 0.12) as a containerd proxy snapshotter, so acceld's startup benchmark can run the
// peer side by side with acceld on the same node, link and images.
//
// Debian ships the library and ctr-remote but not this daemon. This is our own short
// main: one snapshotter, the snapshots gRPC API on a unix socket, a root directory and
// a TOML config (the library's service.Config: fs, resolver, keychain sections).
// Credentials come from the Docker config file only; the CRI and kubeconfig keychains
// are left out (they need Kubernetes client libraries this build does without).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// stopGrace bounds how long in-flight snapshotter calls may finish after a signal:
// the caller (a benchmark tearing a node down) must not hang on a stuck Prepare.
const stopGrace = 10 * time.Second

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve the snapshots API on")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory (snapshots, FUSE mounts, caches)")
	configPath := flag.String("config", "", "TOML config (stargz-snapshotter's service.Config); empty: defaults")
	logLevel := flag.String("log-level", "info", "logrus level: debug, info, warn, error")
	flag.Parse()

	if err := run(*address, *root, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(address, root, configPath, logLevel string) error {
	level, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	// JSON lines, so a harness can find events such as "remote snapshot" mounts.
	logrus.SetLevel(level)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	ctx := log.WithLogger(context.Background(), log.L)

	var config service.Config
	if configPath != "" {
		if _, err := toml.DecodeFile(configPath, &config); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	snapshotter, err := service.NewStargzSnapshotterService(ctx, root, &config,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)))
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	// Close unmounts every FUSE mount the snapshotter made, committed layers included:
	// a benchmark node is thrown away after each run, so nothing should outlive us.
	defer func() {
		if err := snapshotter.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the snapshotter")
		}
	}()

	listener, err := listen(address)
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(snapshotter))

	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	log.G(ctx).WithField("address", address).WithField("root", root).Info("serving")

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-served:
		return err
	case sig := <-signals:
		log.G(ctx).WithField("signal", sig.String()).Info("stopping")
	}
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(stopGrace):
		server.Stop()
	}
	return nil
}

// listen binds the unix socket, replacing a stale one left by a killed predecessor.
func listen(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return nil, err
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return net.Listen("unix", address)
}
